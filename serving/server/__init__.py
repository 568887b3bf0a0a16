"""The OpenAI-compatible HTTP API and the Ray Serve deployments behind it."""
