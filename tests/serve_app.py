"""Helpers for the tests that run a real Serve application and push it around: a private Ray
session on 127.0.0.1, the Serve actors' processes and their memory, and the engine's idle state."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import ray
import requests
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from serving.config import LLMConfig
from serving.server.deployments import deploy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(config: LLMConfig, num_cpus: int | None = None) -> Iterator[str]:
    """A Ray session of this process's own with `config` deployed on it; yields the API's URL."""
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield deploy(config, timeout_s=180)
    finally:
        serve.shutdown()
        ray.shutdown()


def actor_pids(class_name: str) -> list[int]:
    """Process ids of this session's live actors of a class, found among this process's descendants (Ray
    titles an actor's process `ray::Class`, a Serve replica's `ray::ServeReplica:APP:DEPLOYMENT`)."""
    pids = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = (process.cmdline() or [""])[0]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        name = title.removeprefix("ray::").split(".")[0].split(" ")[0]
        if title.startswith("ray::") and (name == class_name or name.endswith(f":{class_name}")):
            pids.append(process.pid)
    return sorted(pids)


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes together, in MiB."""
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def engine_state(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """The LLM replicas' gauges of /metrics, by metric name (summed over replicas)."""
    text = requests.get(f"{url}/metrics", headers=headers, timeout=30).text
    state: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "model" in sample.labels:
                state[sample.name] = state.get(sample.name, 0.0) + sample.value
    return state


def wait_until_idle(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> dict[str, float]:
    """The engine state once nothing runs, waits or holds KV blocks (or whatever it is at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = engine_state(url, headers)
        busy = sum(state.get(f"llmcluster_{name}", 0.0) for name in ("requests_running", "requests_waiting", "kv_cache_usage_ratio"))
        if busy == 0 or time.monotonic() > deadline:
            return state
        time.sleep(0.2)
