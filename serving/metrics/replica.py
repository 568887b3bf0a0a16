"""The metrics of one LLM replica: engine state, token and request counters, latency histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from serving.engine.stats import FINISH_REASONS, EngineSnapshot, EngineStepStats
from serving.metrics import PREFIX

# Bucket bounds in the spirit of vLLM's, with a few more at the fast end for small models on CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class ReplicaMetrics:
    """Every metric carries the labels `model` and `replica`; `update` moves them forward."""

    def __init__(self, model: str, replica: str, tensor_parallel: int, pipeline_parallel: int) -> None:
        self.registry = CollectorRegistry()
        self._labels = {"model": model, "replica": replica}
        Info(f"{PREFIX}_replica", "Parallel layout of the replica's model (always 1).", list(self._labels), registry=self.registry).labels(
            **self._labels
        ).info({"tensor_parallel": str(tensor_parallel), "pipeline_parallel": str(pipeline_parallel)})
        self.healthy = self._gauge("replica_healthy", "1 while the engine is alive and makes progress, else 0.")
        self.running = self._gauge("requests_running", "Requests in the engine's running batch.")
        self.waiting = self._gauge("requests_waiting", "Requests waiting for the engine to admit them.")
        self.kv_usage = self._gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks held by live sequences (0..1).")
        self.model_load = self._gauge("model_load_seconds", "Seconds the engine took to load the model.")
        self.startup = self._gauge("replica_startup_seconds", "Seconds from the replica's constructor start until it was ready.")
        self.prefix_queries = self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = self._counter("preemptions", "Sequences preempted (KV blocks freed, recomputed later).")
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated.")
        finished = Counter(
            f"{PREFIX}_requests_finished", "Requests finished, by reason.", [*self._labels, "finish_reason"], registry=self.registry
        )
        self.finished = {reason: finished.labels(**self._labels, finish_reason=reason) for reason in FINISH_REASONS}
        self.ttft = self._histogram("time_to_first_token_seconds", "From arrival at the engine to the first token.", TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Between two consecutive tokens of a sequence.", ITL_BUCKETS)
        self.e2e = self._histogram("e2e_request_latency_seconds", "From arrival at the engine to the end.", REQUEST_BUCKETS)
        self.queue = self._histogram("request_queue_time_seconds", "From arrival until first scheduled.", REQUEST_BUCKETS)
        self.prefill = self._histogram("request_prefill_time_seconds", "From first scheduled to the first token.", REQUEST_BUCKETS)
        self.decode = self._histogram("request_decode_time_seconds", "From the first token to the last.", REQUEST_BUCKETS)
        self.prompt_len = self._histogram("request_prompt_tokens", "Prompt length of finished requests.", TOKEN_BUCKETS)
        self.output_len = self._histogram("request_generation_tokens", "Tokens generated per finished request.", TOKEN_BUCKETS)
        self._last = EngineSnapshot()

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", documentation, list(self._labels), registry=self.registry).labels(**self._labels)

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(f"{PREFIX}_{name}", documentation, list(self._labels), registry=self.registry).labels(**self._labels)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"{PREFIX}_{name}", documentation, list(self._labels), buckets=buckets, registry=self.registry).labels(
            **self._labels
        )

    def update(self, state: EngineSnapshot, healthy: bool, step: EngineStepStats) -> None:
        """Set the gauges to `state` and `healthy`, count what grew since the last update, observe `step`'s measurements."""
        self.healthy.set(1 if healthy else 0)
        self.running.set(state.num_running)
        self.waiting.set(state.num_waiting)
        self.kv_usage.set(state.kv_cache_usage)
        self.prefix_queries.inc(state.prefix_cache_queries - self._last.prefix_cache_queries)
        self.prefix_hits.inc(state.prefix_cache_hits - self._last.prefix_cache_hits)
        self.preemptions.inc(state.preemptions - self._last.preemptions)
        self._last = state
        self.prompt_tokens.inc(step.prompt_tokens)
        self.generation_tokens.inc(step.generation_tokens)
        for value in step.time_to_first_token_s:
            self.ttft.observe(value)
        for value in step.inter_token_latency_s:
            self.itl.observe(value)
        for request in step.finished:
            self.finished[request.finish_reason].inc()
            self.e2e.observe(request.e2e_s)
            self.queue.observe(request.queue_s)
            if request.prefill_s is not None:
                self.prefill.observe(request.prefill_s)
            if request.decode_s is not None:
                self.decode.observe(request.decode_s)
            self.prompt_len.observe(request.num_prompt_tokens)
            self.output_len.observe(request.num_generation_tokens)

    def count_error(self) -> None:
        """A request failed inside the replica (engine fault), rather than finishing in the engine."""
        self.finished["error"].inc()
