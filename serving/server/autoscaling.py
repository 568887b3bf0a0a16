"""Replica autoscaling for LLM serving: Serve's custom policy on what limits an engine, not on request counts.

Each replica reports (LLMDeployment.record_autoscaling_stats) its waiting requests, KV cache usage,
recent mean time to first token and how long it took to start; Serve averages each per replica over
the look-back period. The policy turns every signal into "replicas needed" (load / target per
replica), takes the largest, and, while that need is rising, plans for where the trend will be once
a new replica is up (now + the measured start-up time). Serve applies the bounds and the quiet period
before removing replicas (downscale_delay_s); removed replicas drain (graceful_shutdown_timeout_s).
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

from ray.serve.config import AutoscalingContext

from serving.config import AutoscalingConfig, ServerConfig


class LLMAutoscalingPolicy:
    """Serve instantiates this once per deployment with `policy_kwargs` and calls it every control loop tick."""

    def __init__(
        self,
        min_replicas: int,
        max_replicas: int,
        target_waiting_requests: float,
        target_kv_cache_usage: float,
        target_ttft_s: float,
        look_back_period_s: float,
    ) -> None:
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.targets = {"waiting": target_waiting_requests, "kv_cache_usage": target_kv_cache_usage, "ttft_s": target_ttft_s}
        self.look_back_period_s = look_back_period_s
        self._history: deque[tuple[float, float]] = deque()  # (time, replicas needed)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        current = ctx.current_num_replicas
        metrics = ctx.aggregated_metrics or {}
        if current == 0 or not metrics.get("waiting"):  # nothing reported yet: keep what Serve aims for
            return ctx.target_num_replicas, {}
        now = time.monotonic()
        needed = replicas_needed(metrics, self.targets)
        self._history.append((now, needed))
        while self._history[0][0] < now - self.look_back_period_s:
            self._history.popleft()
        startup_s = max(metrics.get("startup_s", {}).values(), default=0.0)
        planned = max(needed, forecast(self._history, now + startup_s))
        return min(self.max_replicas, max(self.min_replicas, math.ceil(planned - 1e-9))), {}


def replicas_needed(metrics: dict[str, dict[Any, float]], targets: dict[str, float]) -> float:
    """How many replicas keep every signal at its target: waiting requests add up across replicas,
    KV usage and TTFT are per replica (a mean above target scales the replica count by the ratio)."""
    replicas = len(metrics["waiting"])
    waiting = sum(metrics["waiting"].values()) / targets["waiting"]
    per_replica = [sum(values.values()) / len(values) / targets[name] for name in ("kv_cache_usage", "ttft_s") if (values := metrics.get(name))]
    return max([waiting, *(replicas * ratio for ratio in per_replica)])


def forecast(history: deque[tuple[float, float]], at: float) -> float:
    """The need extrapolated linearly from the oldest to the newest point of `history`, never below the newest."""
    (t0, v0), (t1, v1) = history[0], history[-1]
    if t1 <= t0 or v1 <= v0:
        return v1
    return v1 + (v1 - v0) / (t1 - t0) * (at - t1)


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
                "min_replicas": server.min_replicas,
                "max_replicas": server.max_replicas,
                "target_waiting_requests": scaling.target_waiting_requests,
                "target_kv_cache_usage": scaling.target_kv_cache_usage,
                "target_ttft_s": scaling.target_ttft_s,
                "look_back_period_s": scaling.look_back_period_s,
            },
        },
    }
