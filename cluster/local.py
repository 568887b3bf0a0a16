"""A local Ray cluster that outlives the command that started it, found and stopped again later.

The head node runs as `ray start --head --block` in a session of its own; its address and process
id go to a small state file. Stopping the cluster means signalling that one process: on SIGTERM it
takes its Ray processes down with it. Everything Ray exposes binds to 127.0.0.1, and the cluster
uses Ray's token authentication: its token is the file Ray reads (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token),
created here when there is none (`ray start` does not create one), or Ray's RAY_AUTH_TOKEN variable.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import ray
from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
from ray._private.authentication.authentication_token_setup import _enable_token_auth, _get_default_token_path
from ray._private.ray_constants import DEFAULT_DASHBOARD_PORT, DEFAULT_PORT

from cluster.haproxy import haproxy_env
from cluster.ray_settings import RAY_NODE_ENV, RAY_START_PARAMS

STATE_FILE = "local-cluster.json"
LOG_FILE = "local-cluster.log"
_HOST = "127.0.0.1"
_HEAD_ENV = {
    "RAY_AUTH_MODE": "token",
    # a single-node cluster has nowhere to drain its work to: stop at once rather than after 30 s
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
} | RAY_NODE_ENV


@dataclass
class LocalCluster:
    address: str  # the head's GCS address, host:port
    pid: int  # of the `ray start --block` process
    dashboard_url: str
    log_path: str

    def is_alive(self) -> bool:
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def serve_ingress_env() -> dict[str, str]:
    """Environment for a Ray node whose Serve HTTP ingress (HAProxy, serving/server/serve_env.py) must not
    collide with another Serve instance on this machine: free ports instead of Ray's fixed ones (HAProxy's
    metrics on 9101 and stats page on 8404, both bound to every interface, and the fallback proxy on 8500 and
    9500). Its files need nothing: Ray keeps them in a folder per node. HAProxy runs without splicing
    (cluster/haproxy.py)."""
    names = [
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    ]
    return {name: str(port) for name, port in zip(names, free_ports(len(names)))} | haproxy_env()


def init_private_session(num_cpus: int | None = None) -> None:
    """Start a Ray session of this process's own on this machine (no dashboard, workers' output not echoed, no idle
    workers kept) and connect to it, its Serve ingress kept apart from any other Serve instance here (serve_ingress_env)."""
    saved = dict(os.environ)
    os.environ.update(serve_ingress_env() | RAY_NODE_ENV)  # read by the raylet ray.init starts, and by its workers
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def ensure_auth_token() -> tuple[Path | None, bool]:
    """(the token file Ray's processes will read, whether it was created now). A new token file is readable by
    its owner alone (0600) in a folder only the owner can enter. None when RAY_AUTH_TOKEN holds the token itself."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None, False
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or _get_default_token_path()).expanduser()
    if path.is_file():
        return path, False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile
        return path, False
    with os.fdopen(descriptor, "w") as token_file:
        token_file.write(generate_new_authentication_token())
    return path, True


def find(state_dir: Path) -> LocalCluster | None:
    """The running local cluster recorded in `state_dir`, if any."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    cluster = LocalCluster(**json.loads(path.read_text()))
    if cluster.is_alive():
        return cluster
    path.unlink()
    return None


def start(state_dir: Path, port: int | None = None, dashboard_port: int | None = None, timeout_s: float = 60.0) -> LocalCluster:
    """Start a head node (or return the one already running) and wait until it accepts connections.

    `port` and `dashboard_port` default to Ray's own defaults.
    """
    if (running := find(state_dir)) is not None:
        return running
    ensure_auth_token()
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or DEFAULT_PORT
    dashboard_port = dashboard_port or DEFAULT_DASHBOARD_PORT
    for needed in (port, dashboard_port):
        if _port_in_use(needed):
            raise RuntimeError(f"port {needed} on {_HOST} is in use (another Ray cluster?); choose other ports")
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={port}", f"--node-ip-address={_HOST}",
        "--include-dashboard=true", f"--dashboard-host={_HOST}", f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats", *(f"--{name}={value}" for name, value in RAY_START_PARAMS.items()),
    ]  # fmt: skip
    log_path = state_dir / LOG_FILE
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=os.environ | _HEAD_ENV | serve_ingress_env(),
        )  # fmt: skip
    cluster = LocalCluster(f"{_HOST}:{port}", process.pid, f"http://{_HOST}:{dashboard_port}", str(log_path))
    deadline = time.monotonic() + timeout_s
    while not _port_in_use(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the Ray head did not start; its log is {log_path}:\n{_tail(log_path)}")
        time.sleep(0.2)
    (state_dir / STATE_FILE).write_text(json.dumps(asdict(cluster)))
    return cluster


def connect(address: str, token_auth: bool, token_file: str | None = None) -> None:
    """Connect this process to the cluster at `address` as a driver; quietly.

    With `token_file`, joins a cluster that uses Ray's token authentication with the token in that file
    (as RAY_AUTH_TOKEN_PATH would); Ray's own RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH in the environment works too.
    """
    if token_file is not None:
        path = Path(token_file).expanduser().resolve()
        if not path.is_file():
            raise RuntimeError(f"no Ray authentication token file at {path}")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
        token_auth = True
    if token_auth:  # RAY_AUTH_MODE=token, and make Ray (which read its settings on import) read it again
        _enable_token_auth()
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


def stop(state_dir: Path, timeout_s: float = 60.0) -> bool:
    """Stop the local cluster recorded in `state_dir`; False if none was running."""
    cluster = find(state_dir)
    if cluster is None:
        return False
    os.kill(cluster.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while cluster.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if cluster.is_alive():
        os.killpg(cluster.pid, signal.SIGKILL)
    kill_session_leftovers(cluster.pid)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return True


def kill_session_leftovers(session_id: int) -> None:
    """Kill what is left of a session once its Ray head is gone. Serve stops HAProxy only when Serve itself is shut
    down; a cluster stopped under a running application leaves it behind, holding its ports."""
    for process in psutil.process_iter():
        try:
            if process.pid and os.getsid(process.pid) == session_id:
                process.kill()
        except (OSError, psutil.Error):  # gone meanwhile
            continue


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on every interface a moment ago (all held at once while choosing)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((_HOST, port)) == 0


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
