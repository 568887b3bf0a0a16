"""The chart's CPU demo, end to end without Kubernetes: its rendered serveConfigV2 goes through
`serve deploy` onto a local Ray head (127.0.0.1, free ports) and answers a chat request.

Like the chart's cluster, the head uses Ray's token authentication (the token in ~/.ray/auth_token,
which `ray start` creates when missing). What differs from the cluster: the model comes through a
`pvc`-type source whose mount path is the test's default_model folder, engine limits are small,
ports are free ones, and everything listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from ports import free_ports
from processes import stop_session

from serving.server.deployments import wait_until_healthy
from tests.chart import CHART, render, serve_config, values_file

pytestmark = pytest.mark.slow

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
SERVE = [sys.executable, "-m", "ray.serve.scripts"]
HOST = "127.0.0.1"
TOKEN_AUTH = os.environ | {"RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head of our own, every port chosen free; yields the dashboard URL `serve deploy` talks to."""
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env, client, node_manager, object_manager = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="ray-helm-", dir="/tmp")  # short: Ray puts unix sockets in it
    command = [
        *RAY, "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--num-cpus=2",
        f"--node-ip-address={HOST}", f"--port={gcs}", "--include-dashboard=true", f"--dashboard-host={HOST}",
        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
    ]  # fmt: skip
    env = TOKEN_AUTH | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    url = f"http://{HOST}:{dashboard}"
    with open(Path(temp_dir) / "head.log", "wb") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        _wait_for(lambda: requests.get(f"{url}/api/gcs_healthz", timeout=5).ok, head, 90, "the Ray dashboard")
        yield url
    finally:
        stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_cpu_demo_serve_config_deploys_and_answers(ray_head, default_model, tmp_path):
    api_port, metrics_port = free_ports(2)
    local = {
        "model": {"type": "pvc", "pvc": {"claimName": "local", "mountPath": str(default_model.parent), "path": default_model.name}},
        "llm": {"model": {"max_model_len": 512}, "engine": {"kv_cache_memory_gb": 0.25, "max_num_seqs": 4}, "server": {"port": api_port}},
        "monitoring": {"metricsPort": metrics_port},
    }
    config = serve_config(render(CHART / "examples" / "cpu-demo.yaml", values_file(tmp_path, local)))
    assert config["applications"][0]["args"]["model"]["source"] == str(default_model)
    # the pods listen on 0.0.0.0; this machine's tests on 127.0.0.1 only (the proxy, and the metrics endpoint with it)
    config["http_options"]["host"] = config["applications"][0]["args"]["server"]["host"] = HOST
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config))

    deployed = subprocess.run(
        [*SERVE, "deploy", str(path), "--address", ray_head], check=False, capture_output=True, text=True, timeout=120, env=TOKEN_AUTH
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url = f"http://{HOST}:{api_port}"
    wait_until_healthy(url, timeout_s=150)

    model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}
    answer = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    assert reply["choices"][0]["message"]["content"].strip()
    assert 0 < reply["usage"]["completion_tokens"] <= 16

    status = subprocess.run(
        [*SERVE, "status", "--address", ray_head], check=False, capture_output=True, text=True, timeout=60, env=TOKEN_AUTH
    )
    app = yaml.safe_load(status.stdout)["applications"]["llm"]
    assert app["status"] == "RUNNING" and app["deployments"]["LLMDeployment"]["status"] == "HEALTHY"


def _wait_for(check, process: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {process.returncode} before {what} answered")
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer within {timeout_s:.0f} s")
