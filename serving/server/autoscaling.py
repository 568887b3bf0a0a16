"""Replica autoscaling for LLM serving: Serve's custom policy on what limits an engine, not on request counts.

Each replica reports (LLMDeployment.record_autoscaling_stats) its waiting requests, KV cache usage,
recent mean time to first token and how long its constructor took; Serve averages each per replica
over the look-back period and also counts the requests queued in front of the replicas (handles
waiting for a free slot). The policy turns every signal into "replicas needed" (load / target per
replica) and takes the largest. While that need rises steadily over the look-back period, it plans
for where the trend will be once a new replica is up (now + the measured start-up time), but never
for more than twice the current need: a short burst must not order a fleet. Serve applies the bounds
(min/max replicas), the quiet period before removing replicas (downscale_delay_s), and removed
replicas drain (graceful_shutdown_timeout_s).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

from ray.serve.config import AutoscalingContext

from serving.config import AutoscalingConfig, ServerConfig

MAX_FORECAST_FACTOR = 2.0  # the forecast adds at most this multiple of the current need
MIN_TREND_SPAN = 0.5  # fraction of the look-back period the history must cover before its trend counts


class LLMAutoscalingPolicy:
    """Serve instantiates this once per deployment with `policy_kwargs` and calls it every control loop tick."""

    def __init__(
        self, target_waiting_requests: float, target_kv_cache_usage: float, target_ttft_s: float, look_back_period_s: float
    ) -> None:
        self.targets = {"waiting": target_waiting_requests, "kv_cache_usage": target_kv_cache_usage, "ttft_s": target_ttft_s}
        self.look_back_period_s = look_back_period_s
        self._history: deque[tuple[float, float]] = deque()  # (time, replicas needed)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        if ctx.current_num_replicas == 0 or not metrics.get("waiting"):  # nothing reported yet: keep what Serve aims for
            return ctx.target_num_replicas, {}
        now = time.time() if ctx.current_time is None else ctx.current_time
        needed = replicas_needed(metrics, ctx.total_queued_requests or 0.0, self.targets)
        self._history.append((now, needed))
        while self._history[0][0] < now - self.look_back_period_s:
            self._history.popleft()
        startup_s = max(metrics.get("startup_s", {}).values(), default=0.0)
        planned = forecast(self._history, now + startup_s, MIN_TREND_SPAN * self.look_back_period_s)
        return math.ceil(planned - 1e-9), {}


def replicas_needed(metrics: dict[str, dict[Any, float]], queued: float, targets: dict[str, float]) -> float:
    """How many replicas keep every signal at its target: waiting requests (in the engines plus `queued` in
    front of them) add up across replicas; KV usage and TTFT are per replica (a mean above target scales
    the replica count by the ratio)."""
    replicas = len(metrics["waiting"])
    waiting = (sum(metrics["waiting"].values()) + queued) / targets["waiting"]
    per_replica = [
        sum(values.values()) / len(values) / targets[name] for name in ("kv_cache_usage", "ttft_s") if (values := metrics.get(name))
    ]
    return max([waiting, *(replicas * ratio for ratio in per_replica)])


def forecast(history: deque[tuple[float, float]], at: float, min_span_s: float) -> float:
    """The need at `at`: the newest need plus the least-squares trend of `history` when it rises over at least
    `min_span_s` seconds, capped at MAX_FORECAST_FACTOR times the newest need."""
    newest_t, newest = history[-1]
    if newest_t - history[0][0] < min_span_s:
        return newest
    mean_t = sum(t for t, _ in history) / len(history)
    mean_v = sum(v for _, v in history) / len(history)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in history) / sum((t - mean_t) ** 2 for t, _ in history)
    if slope <= 0:
        return newest
    return min(newest + slope * (at - newest_t), MAX_FORECAST_FACTOR * newest)


def autoscaling_config(server: ServerConfig) -> dict[str, Any]:
    """The LLM deployment's `autoscaling_config` for Serve."""
    scaling: AutoscalingConfig = server.autoscaling
    return {
        "min_replicas": server.min_replicas,
        "max_replicas": server.max_replicas,
        "look_back_period_s": scaling.look_back_period_s,
        "upscale_delay_s": 0.0,  # the policy already plans ahead; waiting longer would only add to TTFT
        "downscale_delay_s": scaling.downscale_delay_s,
        "policy": {
            "policy_function": LLMAutoscalingPolicy,
            "policy_kwargs": {
                "target_waiting_requests": scaling.target_waiting_requests,
                "target_kv_cache_usage": scaling.target_kv_cache_usage,
                "target_ttft_s": scaling.target_ttft_s,
                "look_back_period_s": scaling.look_back_period_s,
            },
        },
    }
