"""Faults under load on the real Serve application: an LLM replica split over two tensor-parallel Worker
processes (tiny model), health checks every second. For each fault, streaming requests are in flight
when it strikes; every one must complete or end with an error the client sees, within the
health-check period's reach (none lost), the application must recover, and the next request succeed.
The last test shuts the application down under a stream, which must drain to its end.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from faults import COMPLETE, ERROR, InFlight, Outcome, complete, stream
from ports import free_port
from ray import serve
from serve_app import served

from benchmarks.soak import actor_pids, wait_until_idle
from serving.config import LLMConfig

pytestmark = pytest.mark.slow

APP = "faults"
MODEL = "tiny-llama"
HEALTH_CHECK_PERIOD_S, STALL_TIMEOUT_S = 1.0, 3.0
# Serve replaces a replica after three failed checks; a fault must show within this, plus the start of a new replica
ERROR_WITHIN_S = 3 * HEALTH_CHECK_PERIOD_S + STALL_TIMEOUT_S + 10
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model) -> Iterator[str]:
    config = LLMConfig.model_validate(
        {
            "model": {"source": str(tiny_model), "max_model_len": 512},
            "engine": {"kv_cache_memory_gb": 0.02, "max_num_seqs": 8},
            "parallel": {"tensor_parallel": 2, "placement_timeout_s": 60},
            "server": {
                "port": free_port(),
                "app_name": APP,
                "health_check_period_s": HEALTH_CHECK_PERIOD_S,
                "health_check_timeout_s": 5,
                "stall_timeout_s": STALL_TIMEOUT_S,
                "autoscaling": {"drain_timeout_s": 60},
            },
        }
    )
    with served(config, num_cpus=4) as url:  # room for a new replica's two workers while the old ones go
        yield url


def _under_fault(server: str, fault: Callable[[], None], non_streaming: bool = True) -> list[Outcome]:
    """Start three long streams (and a long non-streaming request), strike once every stream has a token, then
    collect the outcomes; none may be lost, and none may take longer than ERROR_WITHIN_S after the fault."""
    url = f"{server}/v1/completions"
    flight = InFlight()
    for _ in range(3):
        flight.start(stream, url, LONG, ERROR_WITHIN_S)
    if non_streaming:
        flight.start(complete, url, LONG, ERROR_WITHIN_S + 30)
    flight.wait_for_first_tokens(60)
    struck = time.monotonic()
    fault()
    outcomes = flight.join(ERROR_WITHIN_S + 60)
    lost = [o for o in outcomes if o.kind not in (COMPLETE, ERROR)]
    assert not lost, f"{len(lost)} requests lost without an error: {[o.detail for o in lost]}"
    slowest = max(o.ended for o in outcomes) - struck
    assert slowest < ERROR_WITHIN_S, f"a request ended {slowest:.0f} s after the fault"
    return outcomes


def _recovered(server: str, old_replica: list[int], timeout_s: float = 120) -> list[int]:
    """Wait for a new, healthy LLM replica; the next request must succeed. Returns the new replica's pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deployment = serve.status().applications[APP].deployments["LLMDeployment"]
        replica = actor_pids("LLMDeployment")
        if deployment.status.value == "HEALTHY" and replica and replica != old_replica:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no new healthy LLM replica within {timeout_s:.0f} s: {serve.status().applications[APP]}")
    outcome = Outcome()
    complete(outcome, f"{server}/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 4}, 60)
    assert outcome.kind == COMPLETE, outcome.detail
    assert len(actor_pids("Worker")) == 2
    wait_until_idle(server)
    return replica


def test_killing_a_tensor_parallel_worker_fails_its_requests_and_the_replica_is_replaced(server):
    replica, workers = actor_pids("LLMDeployment"), actor_pids("Worker")
    assert len(replica) == 1 and len(workers) == 2
    outcomes = _under_fault(server, lambda: os.kill(workers[1], signal.SIGKILL))
    errors = [o for o in outcomes if o.kind == ERROR]
    assert errors and all("worker" in o.detail or o.detail.startswith("HTTP 5") for o in errors), [o.detail for o in outcomes]
    _recovered(server, replica)


def test_a_stuck_worker_makes_the_replica_unhealthy_and_it_is_replaced(server):
    replica, workers = actor_pids("LLMDeployment"), actor_pids("Worker")
    outcomes = _under_fault(server, lambda: os.kill(workers[0], signal.SIGSTOP))  # alive, but no progress
    assert all(o.kind == ERROR for o in outcomes), [(o.kind, o.detail) for o in outcomes]
    _recovered(server, replica)
    try:
        os.kill(workers[0], signal.SIGKILL)  # Serve killed the replica; its worker went with it or goes now
    except ProcessLookupError:
        pass


def test_killing_the_llm_replica_fails_its_requests_and_serve_restarts_it(server):
    replica = actor_pids("LLMDeployment")
    outcomes = _under_fault(server, lambda: os.kill(replica[0], signal.SIGKILL))
    assert any(o.kind == ERROR for o in outcomes), [(o.kind, o.detail) for o in outcomes]
    _recovered(server, replica)


def _haproxy_pids() -> list[int]:
    """The HAProxy processes Serve's proxy managers run (Serve's HTTP ingress here, serving/server/serve_env.py)."""
    pids = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name() == "haproxy":
                pids.append(process.pid)
        except psutil.NoSuchProcess:  # exited between the listing and the question (the killed proxy, say)
            continue
    return sorted(pids)


def test_killing_the_http_proxy_drops_connections_visibly_and_it_comes_back(server):
    replica, [proxy] = actor_pids("LLMDeployment"), _haproxy_pids()
    outcomes = _under_fault(server, lambda: os.kill(proxy, signal.SIGKILL))
    assert any(o.kind == ERROR for o in outcomes), [(o.kind, o.detail) for o in outcomes]
    deadline = time.monotonic() + 120
    while _haproxy_pids() in ([], [proxy]) and time.monotonic() < deadline:
        time.sleep(0.5)
    outcome = Outcome()
    while time.monotonic() < deadline and outcome.kind != COMPLETE:
        complete(outcome, f"{server}/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 4}, 30)
        time.sleep(0.5)
    assert outcome.kind == COMPLETE, outcome.detail
    assert actor_pids("LLMDeployment") == replica  # the replica was not touched
    idle = wait_until_idle(server)  # the dropped requests were aborted: their KV blocks are free again
    assert idle["requests_running"] == 0 and idle["kv_cache_usage_ratio"] == 0, idle


def test_shutdown_drains_a_running_stream(server):
    flight = InFlight()
    [running] = [flight.start(stream, f"{server}/v1/completions", LONG | {"max_tokens": 30}, 60)]
    flight.wait_for_first_tokens(60)
    deleting = threading.Thread(target=serve.delete, args=(APP,))
    deleting.start()
    flight.join(90)
    deleting.join(90)
    assert running.kind == COMPLETE, running.detail
    assert APP not in serve.status().applications
