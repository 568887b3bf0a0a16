"""Benchmark metrics, defined as vLLM's `bench serve` defines them.

- TTFT: time from sending a request to its first output chunk.
- TPOT: per request, (end-to-end latency - TTFT) / (output tokens - 1): the first token is excluded;
  requests with one output token have none.
- ITL: every gap between consecutive output chunks, pooled over all requests.
- E2EL: time from sending a request to its last byte.
Each is reported in milliseconds as mean, median, p90 and p99 (linear interpolation), over the
successful requests. Throughputs divide by the benchmark's duration (first send to last answer).
Goodput counts the successful requests that meet every given limit, per second.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serving.loadtest.client import RequestResult

STATS = ("mean", "median", "p90", "p99")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, median, p90 and p99 of `values_s` (seconds) in milliseconds; None for an empty list."""
    if not values_s:
        return dict.fromkeys(STATS)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def request_latencies(result: RequestResult) -> dict[str, Any]:
    """One successful request's TTFT, TPOT (None for a single token), ITL gaps and E2EL, in seconds."""
    times = result.chunk_times
    e2el = result.end - result.start
    ttft = times[0]
    tpot = (e2el - ttft) / (result.output_len - 1) if result.output_len > 1 else None
    return {"ttft": ttft, "tpot": tpot, "itl": [b - a for a, b in itertools.pairwise(times)], "e2el": e2el}


def summarize(results: Sequence[RequestResult], duration_s: float, slo_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The summary of one load point. `slo_ms` maps "ttft", "tpot" and/or "e2el" to limits for goodput."""
    ok = [r for r in results if r.ok]
    per_request = [request_latencies(r) for r in ok]
    pooled: dict[str, list[float]] = {
        "ttft": [p["ttft"] for p in per_request],
        "tpot": [p["tpot"] for p in per_request if p["tpot"] is not None],
        "itl": [gap for p in per_request for gap in p["itl"]],
        "e2el": [p["e2el"] for p in per_request],
    }
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": output_tokens / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s if duration_s > 0 else 0.0,
    }
    for name in LATENCIES:
        summary[f"{name}_ms"] = distribution_ms(pooled[name])
    if slo_ms:
        good = sum(_meets(p, slo_ms) for p in per_request)
        summary["slo_ms"] = dict(slo_ms)
        summary["goodput"] = good / duration_s if duration_s > 0 else 0.0
    return summary


def _meets(latencies: Mapping[str, Any], slo_ms: Mapping[str, float]) -> bool:
    for name, limit in slo_ms.items():
        value = latencies[name]
        if value is not None and value * 1000.0 > limit:
            return False
    return True
