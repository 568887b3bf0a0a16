"""A short soak (benchmarks/soak.py, 45 s here; the ~10-minute run is `python -m benchmarks.soak`):
mixed streaming and non-streaming load with client disconnects, more clients than the server takes,
on the tiny model. Nothing but back-pressure may fail, and the server must go back to idle."""

from __future__ import annotations

import pytest
from ports import free_port
from serve_app import served

from benchmarks.soak import actor_pids, run_soak
from serving.config import LLMConfig

pytestmark = pytest.mark.slow


def test_short_soak_ends_clean_and_idle(tiny_model):
    config = LLMConfig.model_validate(
        {
            "model": {"source": str(tiny_model), "max_model_len": 256},
            "engine": {"kv_cache_memory_gb": 0.02, "max_num_seqs": 8},
            "server": {"port": free_port(), "max_ongoing_requests": 3, "max_queued_requests": 1},
        }
    )
    with served(config) as url:
        report = run_soak(url, "tiny-llama", 45, 6, lambda: actor_pids("APIIngress") + actor_pids("LLMDeployment"))
    assert report.clean, report
    assert report.outcomes["ok"] > 50 and report.outcomes["disconnected"] > 5, report.outcomes
    assert report.rss_mb_after - report.rss_mb_before < 64, report
