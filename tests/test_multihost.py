"""A Ray cluster over three hosts, each a network namespace with its own IP address: a head without
CPUs for work and two worker hosts. `llmcluster serve --address` deploys the default model with two
pipeline stages onto it; the stages must land on the two worker hosts and answer over HTTP.
Token authentication is on, as on a real shared cluster, and the nodes are started as the README says
(Serve's HAProxy through llmcluster-haproxy).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

import netns
import psutil
import pytest
import requests

from cluster.haproxy import haproxy_env

pytestmark = [pytest.mark.slow, pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

RAY_PORT, API_PORT, DASHBOARD_PORT = 6379, 8000, 8265
BIN = Path(sys.executable).parent

_WORKER_NODES = """
import json, ray
from ray.util.state import list_actors
ray.init(address="{address}", log_to_driver=False)
ips = {{n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}}
workers = list_actors(address="{dashboard}", filters=[("class_name", "=", "Worker"), ("state", "=", "ALIVE")])
print(json.dumps(sorted(ips[a.node_id] for a in workers)))
"""


def _wait_for_nodes(head: netns.Host, env: dict[str, str], count: int, timeout_s: float = 120) -> None:
    script = f'import ray; ray.init(address="{head.ip}:{RAY_PORT}", log_to_driver=False); print(sum(n["Alive"] for n in ray.nodes()))'
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = head.run(str(BIN / "python"), "-c", script, env=env, timeout=60)
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"the cluster did not reach {count} nodes: {result.stdout[-500:]} {result.stderr[-2000:]}")


def test_pipeline_stages_on_separate_hosts_serve_through_the_cli(default_model, tmp_path):
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env |= haproxy_env()  # what the README has nodes started with
    ray_start = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats"]
    with netns.hosts(["head", "worker1", "worker2"]) as hosts:
        head = hosts["head"]
        address = f"{head.ip}:{RAY_PORT}"
        head.start(
            *ray_start, "--head", f"--node-ip-address={head.ip}", f"--port={RAY_PORT}", "--num-cpus=0", f"--temp-dir={head.temp_dir}",
            "--include-dashboard=true", f"--dashboard-host={head.ip}", f"--dashboard-port={DASHBOARD_PORT}",
            env=env, log=str(tmp_path / "head.log"),
        )  # fmt: skip
        time.sleep(5)
        for name in ("worker1", "worker2"):
            host = hosts[name]
            host.start(
                *ray_start,
                f"--address={address}",
                f"--node-ip-address={host.ip}",
                "--num-cpus=2",
                f"--temp-dir={host.temp_dir}",
                env=env,
                log=str(tmp_path / f"{name}.log"),
            )
        _wait_for_nodes(head, env, 3)

        serve = head.run(
            str(BIN / "llmcluster"), "serve", f"--address={address}", f"--model={default_model}", "--pipeline-parallel=2",
            "--host=0.0.0.0", f"--port={API_PORT}", "--max-model-len=512", "--kv-cache-memory-gb=0.1", "--timeout=400",
            env=env, timeout=480,
        )  # fmt: skip
        assert serve.returncode == 0, serve.stderr[-3000:]
        assert f"http://{head.ip}:{API_PORT}" in serve.stdout or f":{API_PORT}" in serve.stdout

        answer = requests.post(
            f"http://{head.ip}:{API_PORT}/v1/chat/completions",
            json={
                "model": default_model.name,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16,
                "temperature": 0,
            },
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        haproxies = [p.info["cmdline"] for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "haproxy"]
        assert haproxies and all("-dS" in cmdline for cmdline in haproxies), haproxies  # started without splicing

        placed = head.run(
            str(BIN / "python"),
            "-c",
            _WORKER_NODES.format(address=address, dashboard=f"http://{head.ip}:{DASHBOARD_PORT}"),
            env=env,
            timeout=120,
        )
        assert placed.returncode == 0, placed.stderr[-2000:]
        worker_ips = json.loads(placed.stdout.strip().splitlines()[-1])
        assert worker_ips == sorted([hosts["worker1"].ip, hosts["worker2"].ip])  # one stage on each worker host
