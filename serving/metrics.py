"""Prometheus metrics of the API and its engines, served at GET /metrics in the text exposition format.

Every name starts with `llmcluster_` and uses base units; only counters end in `_total`.
"""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from serving.server.messages import EngineStats

PREFIX = "llmcluster"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class APIMetrics:
    """The metrics one API replica exports: its own HTTP traffic and the engine state it last saw."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template and status class (2xx, 4xx, 5xx).",
            ["route", "status_class"],
            registry=self.registry,
        )
        engine = ["model", "replica"]
        self.running = self._gauge("engine_running_requests", "Requests in the engine's running batch.", engine)
        self.waiting = self._gauge("engine_waiting_requests", "Requests waiting for the engine to admit them.", engine)
        self.kv_usage = self._gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks held by live sequences.", engine)
        self.kv_used = self._gauge("kv_cache_used_blocks", "KV cache blocks held by live sequences.", engine)
        self.kv_total = self._gauge("kv_cache_blocks", "KV cache blocks of the engine.", engine)

    def _gauge(self, name: str, documentation: str, labels: list[str]) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", documentation, labels, registry=self.registry)

    def count_request(self, route: str, status: int) -> None:
        self.http_requests.labels(route=route, status_class=f"{status // 100}xx").inc()

    def record_engine(self, stats: EngineStats) -> None:
        labels = {"model": stats.model, "replica": stats.replica}
        self.running.labels(**labels).set(stats.num_running)
        self.waiting.labels(**labels).set(stats.num_waiting)
        self.kv_usage.labels(**labels).set(stats.kv_cache_usage)
        self.kv_used.labels(**labels).set(stats.kv_blocks_used)
        self.kv_total.labels(**labels).set(stats.kv_blocks_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
