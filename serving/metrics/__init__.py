"""Prometheus metrics of the engines (per LLM replica) and of the API ingress.

Every name starts with `llmcluster_` and uses base units (seconds, ratios 0..1, tokens); only
counters end in `_total`. docs/metrics.md lists each metric. Every process keeps its metrics in
its own registry and pushes them to its node's exporter (export.py), which Prometheus scrapes.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

PREFIX = "llmcluster"
CONTENT_TYPE = CONTENT_TYPE_LATEST
