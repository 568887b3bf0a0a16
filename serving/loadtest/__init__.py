"""Load testing for OpenAI-compatible endpoints: `llmcluster bench run | sweep | compare`.

workloads.py builds the requests, client.py sends one and times its stream (engine_target.py does
the same against an in-process engine), load.py drives the load shapes, metrics.py turns timings
into vLLM-defined metrics, report.py / plots.py / compare.py present them, cli.py is the command.
"""
