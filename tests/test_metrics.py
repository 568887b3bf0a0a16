"""Metrics from a real engine run, the documented metric table, merging snapshots, and the autoscaling policy."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext

from serving.config import LLMConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineSnapshot, EngineStepStats
from serving.metrics.api import APIMetrics
from serving.metrics.export import merge, render
from serving.metrics.replica import ReplicaMetrics
from serving.server.autoscaling import LLMAutoscalingPolicy, forecast, replicas_needed

DOC = Path(__file__).resolve().parent.parent / "docs/metrics.md"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def engine_state(engine: LLMEngine) -> EngineSnapshot:
    blocks = engine.blocks
    return EngineSnapshot(
        engine.num_running,
        engine.num_waiting,
        blocks.usage,
        blocks.prefix_queries,
        blocks.prefix_hits,
        engine.scheduler.num_preemptions,
    )


@pytest.fixture(scope="module")
def engine(tiny_model) -> LLMEngine:
    return LLMEngine(tiny_config(tiny_model), collect_stats=True)


def tiny_config(tiny_model) -> LLMConfig:
    return LLMConfig.model_validate({"model": {"source": str(tiny_model)}, "engine": {"block_size": 4, "kv_cache_memory_gb": 0.02}})


def test_engine_run_becomes_counters_and_histograms(engine):
    prompt = list(range(1, 11))
    engine.add_request("done", prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    engine.add_request("aborted", list(range(20, 26)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("aborted")
    while engine.has_unfinished_requests():
        engine.step()
    step = engine.take_stats()
    assert step.prompt_tokens == 16 and step.generation_tokens == 5 + 2
    assert len(step.time_to_first_token_s) == 2 and len(step.inter_token_latency_s) == 4 + 1
    assert sorted(r.finish_reason for r in step.finished) == ["abort", "length"]
    assert engine.take_stats().generation_tokens == 0, "taking the stats starts a new collection"

    metrics = ReplicaMetrics("tiny", "r1", tensor_parallel=2, pipeline_parallel=1)
    metrics.update(engine_state(engine), True, step)
    metrics.count_error()
    values = samples(render(list(metrics.registry.collect())).decode())
    labels = {("model", "tiny"), ("replica", "r1")}

    def value(name: str, **extra: str) -> float:
        return values[(name, frozenset(labels | set(extra.items())))]

    assert value("llmcluster_replica_info", tensor_parallel="2", pipeline_parallel="1") == 1
    assert value("llmcluster_generation_tokens_total") == 7 and value("llmcluster_prompt_tokens_total") == 16
    assert [value("llmcluster_requests_finished_total", finish_reason=r) for r in ("stop", "length", "abort", "error")] == [0, 1, 1, 1]
    assert value("llmcluster_time_to_first_token_seconds_count") == 2 and value("llmcluster_e2e_request_latency_seconds_count") == 2
    assert value("llmcluster_request_generation_tokens_sum") == 7 and value("llmcluster_request_prompt_tokens_sum") == 16
    assert value("llmcluster_request_decode_time_seconds_count") == 2 and value("llmcluster_kv_cache_usage_ratio") == 0
    assert value("llmcluster_prefix_cache_queries_total") == engine.blocks.prefix_queries > 0


def test_engines_nobody_takes_stats_from_keep_none(tiny_model):
    """Offline use (LLM.generate, llmcluster generate, benchmarks, AsyncLLMEngine outside Serve) never takes the
    stats, so a long run must not pile them up; the request timestamps the outputs carry are still set."""
    engine = LLMEngine(tiny_config(tiny_model))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i in range(40):
        engine.add_request(f"r{i}", [1 + i % 7, 2, 3], params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert engine.stats is None
    assert engine.take_stats() == EngineStepStats()
    assert all(o.first_token_time is not None for o in outputs)

    async def run(engine: AsyncLLMEngine) -> None:
        for i in range(20):
            async for _ in engine.generate([1, 2, 3 + i], params):
                pass

    async_engine = AsyncLLMEngine(tiny_config(tiny_model))
    asyncio.run(run(async_engine))
    assert async_engine.take_stats() == EngineStepStats()


def test_counters_grow_by_what_changed_since_the_last_update(engine):
    metrics = ReplicaMetrics("tiny", "r1", 1, 1)
    empty = engine.take_stats()
    metrics.update(EngineSnapshot(0, 0, 0.0, 100, 40, 3), True, empty)
    metrics.update(EngineSnapshot(2, 5, 0.5, 130, 50, 4), False, empty)
    values = samples(render(list(metrics.registry.collect())).decode())
    labels = frozenset({("model", "tiny"), ("replica", "r1")})
    assert values[("llmcluster_prefix_cache_queries_total", labels)] == 130 and values[("llmcluster_preemptions_total", labels)] == 4
    assert values[("llmcluster_requests_waiting", labels)] == 5 and values[("llmcluster_replica_healthy", labels)] == 0


def test_every_exported_metric_is_documented_and_nothing_else():
    exported = set()
    for registry in (ReplicaMetrics("m", "r", 1, 1).registry, APIMetrics("a").registry):
        for family in registry.collect():
            exported.add(family.name + ("_total" if family.type == "counter" else "_info" if family.type == "info" else ""))
    documented = set(re.findall(r"^\| `(llmcluster_\w+)` \|", DOC.read_text(), flags=re.MULTILINE))
    assert documented == exported


def test_snapshots_of_several_processes_merge_into_one_family_each():
    one, two = APIMetrics("a"), APIMetrics("b")
    one.count_request("/v1/completions", 200, 0.2)
    two.count_request("/v1/completions", 503, 0.01)
    two.rejected.inc()
    text = render(merge([*one.registry.collect(), *two.registry.collect()])).decode()
    assert text.count("# TYPE llmcluster_http_requests_total counter") == 1
    values = samples(text)
    assert (
        values[("llmcluster_http_requests_total", frozenset({("replica", "b"), ("route", "/v1/completions"), ("status_class", "5xx")}))]
        == 1
    )
    assert values[("llmcluster_http_requests_rejected_total", frozenset({("replica", "b")}))] == 1
    assert values[("llmcluster_http_requests_rejected_total", frozenset({("replica", "a")}))] == 0


TARGETS = {"waiting": 2.0, "kv_cache_usage": 0.8, "ttft_s": 1.0}


def test_replicas_needed_takes_the_tightest_signal():
    idle = {"waiting": {"a": 0.0, "b": 0.0}, "kv_cache_usage": {"a": 0.2, "b": 0.2}, "ttft_s": {"a": 0.1, "b": 0.3}}
    assert replicas_needed(idle, 0.0, TARGETS) == pytest.approx(0.5)  # KV: 2 replicas x 0.2 / 0.8
    queued = idle | {"waiting": {"a": 5.0, "b": 3.0}}
    assert replicas_needed(queued, 0.0, TARGETS) == pytest.approx(4.0)
    assert replicas_needed(queued, 4.0, TARGETS) == pytest.approx(6.0), "requests queued in front of the replicas wait too"
    slow = idle | {"ttft_s": {"a": 3.0, "b": 2.0}}
    assert replicas_needed(slow, 0.0, TARGETS) == pytest.approx(5.0)


def test_forecast_extends_a_steady_rise_only():
    rising = deque([(float(t), 1.0 + 0.1 * t) for t in range(11)])  # 1.0 .. 2.0 over 10 s
    assert forecast(rising, at=15.0, min_span_s=5.0) == pytest.approx(2.5)
    assert forecast(rising, at=100.0, min_span_s=5.0) == pytest.approx(4.0), "at most twice the current need"
    falling = deque([(float(t), 3.0 - 0.1 * t) for t in range(11)])
    assert forecast(falling, at=30.0, min_span_s=5.0) == pytest.approx(2.0)
    assert forecast(deque([(5.0, 2.0)]), at=30.0, min_span_s=5.0) == 2.0
    assert forecast(deque([(0.0, 1.0), (2.0, 2.0)]), at=30.0, min_span_s=5.0) == 2.0, "two seconds are no trend yet"


def test_forecast_does_not_amplify_noise():
    """A flat need with one late jump (a burst, or a replica's average moving): the old end-to-end slope
    (2 / 0.1 s) times a 600 s start-up asked for hundreds of replicas; the fit over the window and the cap don't."""
    history = deque([(t / 10, 1.0) for t in range(100)] + [(10.0, 3.0)])
    planned = forecast(history, at=610.0, min_span_s=5.0)
    assert 3.0 <= planned <= 6.0
    noisy = deque([(t / 10, 1.0 + 0.3 * (t % 2)) for t in range(101)])  # 1.0, 1.3, 1.0, ... : no trend
    assert forecast(noisy, at=610.0, min_span_s=5.0) <= 2 * 1.3


def context(current: int, metrics: dict[str, dict[str, float]], at: float, queued: float = 0.0) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="LLMDeployment", app_name="llm"), deployment_name="LLMDeployment", app_name="llm",
        current_num_replicas=current, target_num_replicas=current, running_replicas=[], total_num_requests=0.0,
        total_queued_requests=queued, aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=at, config=None,
    )  # fmt: skip


def signals(waiting: float, startup_s: float) -> dict[str, dict[str, float]]:
    return {"waiting": {"a": waiting}, "kv_cache_usage": {"a": 0.1}, "ttft_s": {"a": 0.2}, "startup_s": {"a": startup_s}}


def policy() -> LLMAutoscalingPolicy:
    return LLMAutoscalingPolicy(target_waiting_requests=2, target_kv_cache_usage=0.8, target_ttft_s=1, look_back_period_s=10)


def test_policy_scales_on_the_load():
    scaler = policy()
    assert scaler(context(1, signals(0, 0), at=0.0))[0] == 1
    assert scaler(context(1, signals(2.5, 0), at=1.0))[0] == 2, "1.25 replicas needed"
    assert scaler(context(2, signals(0, 0), at=2.0, queued=5.0))[0] == 3, "2.5 replicas needed for the queue"
    assert scaler(context(2, signals(100.0, 0), at=3.0))[0] == 50, "Serve applies max_replicas, not the policy"
    assert scaler(context(0, {}, at=4.0))[0] == 0, "before any replica reports, keep Serve's target"


@pytest.mark.parametrize("startup_s, expected", [(0.0, 2), (10.0, 3), (600.0, 3)])
def test_policy_plans_for_the_replica_start_up_time(startup_s, expected):
    scaler = policy()
    for t in range(6):  # 1.0 replicas needed, rising by 0.1 per second to 1.5
        decision = scaler(context(1, signals(2.0 + 0.2 * t, startup_s), at=float(t)))[0]
    # in `startup_s` seconds 1.5 + 0.1 * startup_s, but never more than twice the 1.5 needed now
    assert decision == expected
