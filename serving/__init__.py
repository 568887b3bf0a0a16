"""llm-cluster serving: the inference engine, its parallel execution and the HTTP API."""
