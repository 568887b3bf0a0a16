"""The metrics of one API ingress replica: HTTP traffic by route and status class, and back-pressure."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from serving.metrics import PREFIX

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class APIMetrics:
    def __init__(self, replica: str) -> None:
        self.registry = CollectorRegistry()
        self._replica = replica
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template and status class (2xx, 4xx, 5xx).",
            ["replica", "route", "status_class"],
            registry=self.registry,
        )
        self.duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "From the request's arrival to the end of its response (the whole stream for SSE).",
            ["replica", "route"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_http_requests_rejected",
            "Requests refused with 503 because every LLM replica and the queue were full (back-pressure).",
            ["replica"],
            registry=self.registry,
        ).labels(replica=replica)
        self.rate_limited = Counter(
            f"{PREFIX}_http_requests_rate_limited",
            "Requests refused with 429 because their API key used up its requests or tokens per minute.",
            ["replica"],
            registry=self.registry,
        ).labels(replica=replica)

    def count_request(self, route: str, status: int, duration_s: float) -> None:
        self.http_requests.labels(replica=self._replica, route=route, status_class=f"{status // 100}xx").inc()
        self.duration.labels(replica=self._replica, route=route).observe(duration_s)
