"""`--address` with `--ray-auth-token-file`: the CLI joins a Ray cluster that uses token authentication,
and without the token it is turned away. The cluster is a head of this test's own on 127.0.0.1, every
port a free one, its token a fresh random one (not ~/.ray/auth_token)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_ports
from processes import stop_session

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
LLMCLUSTER = str(Path(sys.executable).parent / "llmcluster")
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(GCS address, token file) of a token-authenticated Ray head."""
    token = secrets.token_hex(16)
    token_file = tmp_path_factory.mktemp("ray-token") / "token"
    token_file.write_text(token)
    gcs, agent, agent_grpc, metrics, runtime_env, client, node_manager, object_manager = free_ports(8)
    temp_dir = tempfile.mkdtemp(prefix="ray-tok-", dir="/tmp")  # short: Ray puts unix sockets in it
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        "--num-cpus=1", f"--node-ip-address={HOST}", f"--port={gcs}", "--include-dashboard=false",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
    ]  # fmt: skip
    env = CLEAN_ENV | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while socket.socket().connect_ex((HOST, gcs)) != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        yield f"{HOST}:{gcs}", token_file
    finally:
        stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def status(address: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLMCLUSTER, "status", f"--address={address}", *flags], env=CLEAN_ENV, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_token_file_lets_the_cli_join(token_cluster):
    address, token_file = token_cluster
    joined = status(address, f"--ray-auth-token-file={token_file}")
    assert f"On the Ray cluster at {address}" in joined.stdout, joined.stderr[-2000:]
    assert "No application 'llm'" in joined.stdout


def test_without_the_token_the_cli_is_turned_away(token_cluster, tmp_path):
    address, _ = token_cluster
    refused = status(address)
    assert refused.returncode != 0 and "On the Ray cluster" not in refused.stdout
    missing = status(address, f"--ray-auth-token-file={tmp_path / 'missing'}")
    assert missing.returncode == 1 and "no Ray authentication token file" in missing.stderr
