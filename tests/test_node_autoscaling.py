"""Node autoscaling end to end on Ray's autoscaler with its fake multi-node provider (tests/autoscaling_cluster.py).

The head has 1 CPU; the autoscaler may add up to two worker nodes of 2 CPUs, and removes one after
6 s idle. LLM replicas that reserve 2 CPUs (server.replica_cpus) fit only on a worker node, as do
tensor-parallel workers that need 1 CPU each in a group of two: each of them makes the autoscaler
add a node, and the node goes once nothing runs on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import ray
import requests
from ports import free_port
from ray import serve

from cluster import local
from cluster.placement import PlacementError, place_workers
from serving.config import LLMConfig
from serving.server.deployments import deploy
from serving.server.llm_replica import LLMDeployment
from serving.server.serve_env import SERVE_CONTROLLER_ENV
from tests.autoscaling_cluster import AutoscalingCluster, start

pytestmark = pytest.mark.slow

HEAD_CPUS = 1
WORKER_TYPES = {"cpu2": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 2}}
IDLE_TIMEOUT_MINUTES = 0.1
BODY = {"model": "tiny-llama", "prompt": "The quick brown fox", "max_tokens": 64, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def cluster() -> Iterator[AutoscalingCluster]:
    cluster = start(HEAD_CPUS, WORKER_TYPES, IDLE_TIMEOUT_MINUTES)
    try:
        local.connect(cluster.address, token_auth=True)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str | Callable[[], str]) -> float:
    """Seconds until `condition` held; fails the test after `timeout_s`, saying `what` did not happen."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s:.0f} s: {what if isinstance(what, str) else what()}"
        time.sleep(0.5)
    return time.monotonic() - started


def test_parallel_workers_wait_for_the_node_the_autoscaler_adds(cluster):
    assert cluster.worker_nodes() == []
    with pytest.raises(PlacementError, match="no node can hold"):  # without autoscaling: refused at once
        place_workers(2, 1, {"CPU": 1.0}, timeout_s=5)
    placement = place_workers(2, 1, {"CPU": 1.0}, timeout_s=60, autoscaling=True)
    try:
        [node] = cluster.worker_nodes()
        assert placement.node_ids == [node, node]
    finally:
        placement.release()
    removed_after = wait_for(lambda: cluster.worker_nodes() == [], 60, lambda: f"the idle node is removed; {cluster.autoscaler_report()}")
    print(f"idle node removed {removed_after:.1f} s after the workers' placement group")


def running_replicas() -> int:
    return serve.status().applications["llm"].deployments[LLMDeployment.name].replica_states.get("RUNNING", 0)


def test_replicas_that_need_a_node_make_the_autoscaler_add_it_and_remove_it_after_idle(cluster, tiny_model):
    port = free_port()
    config = LLMConfig.model_validate(
        {
            "model": {"source": str(tiny_model)},
            "engine": {"kv_cache_memory_gb": 0.02, "block_size": 4, "max_num_seqs": 2},
            "parallel": {"cluster_autoscales": True},  # else a replica no node can hold is refused before deploying
            "server": {
                "port": port,
                "min_replicas": 1,
                "max_replicas": 2,
                "replica_cpus": 2,
                "max_ongoing_requests": 16,
                "autoscaling": {"target_waiting_requests": 1, "look_back_period_s": 3, "downscale_delay_s": 5, "drain_timeout_s": 30},
            },
        }
    )
    # Every fake node is this machine: one HTTP proxy (on the head) rather than one per node on the same port.
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": config.server.host, "port": port},
        controller_options={"runtime_env": {"env_vars": SERVE_CONTROLLER_ENV}},
    )
    try:
        started = time.monotonic()
        url = deploy(config, timeout_s=150)
        print(f"first replica up on an added node after {time.monotonic() - started:.1f} s")
        assert len(cluster.worker_nodes()) == 1 and running_replicas() == 1

        stop = threading.Event()
        statuses: list[int] = []

        def client() -> None:
            while not stop.is_set():
                statuses.append(requests.post(f"{url}/v1/completions", json=BODY, timeout=120).status_code)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            scaled_out = wait_for(lambda: running_replicas() == 2, 120, "the load adds a replica")
            assert len(cluster.worker_nodes()) == 2
            assert ray.available_resources().get("CPU", 0) == HEAD_CPUS  # each worker node's 2 CPUs hold one replica
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
        print(f"second replica on a second added node {scaled_out:.1f} s after the load started; {len(statuses)} requests")
        assert set(statuses) <= {200, 503} and 200 in statuses

        scaled_in = wait_for(lambda: running_replicas() == 1, 60, "the replica added for the load is removed")
        node_removed = wait_for(lambda: len(cluster.worker_nodes()) == 1, 60, lambda: f"its node is removed; {cluster.autoscaler_report()}")
        print(f"replica removed {scaled_in:.1f} s after the load stopped, its node {node_removed:.1f} s later")
    finally:
        serve.shutdown()
