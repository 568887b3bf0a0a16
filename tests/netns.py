"""Test hosts in Linux network namespaces: each namespace is a host with its own IP address on a
private bridge, so a Ray cluster spread over them talks over real interfaces, not loopback.

Needs root and iproute2; everything is torn down on exit, and names carry this process's id so
parallel runs don't collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Host:
    namespace: str
    ip: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def temp_dir(self) -> str:
        """A scratch folder of this host's own (real hosts don't share /tmp; Ray's sockets live there)."""
        return f"/tmp/{self.namespace}"

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]

    def start(self, *args: str, env: dict[str, str] | None = None, log: str | None = None) -> subprocess.Popen:
        """A long-running process on this host, in a session of its own (stopped at teardown)."""
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (written until teardown)
        process = subprocess.Popen(self.command(*args), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), env=env, capture_output=True, text=True, timeout=timeout, check=False)


def available() -> str | None:
    """None when namespaces can be made here, otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def hosts(names: list[str]) -> Iterator[dict[str, Host]]:
    """One namespace per name on a fresh bridge; the bridge end in this namespace is .1."""
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    bridge = f"llmbr{tag}"
    made: dict[str, Host] = {}
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, name in enumerate(names):
            host = Host(f"llmc{tag}-{name}", f"{subnet}.{i + 2}")
            _ip("netns", "add", host.namespace)
            made[name] = host
            outside, inside = f"llv{tag}{i}", f"llp{tag}{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", host.namespace)
            for args in (("addr", "add", f"{host.ip}/24", "dev", inside), ("link", "set", inside, "up"), ("link", "set", "lo", "up")):
                _ip("netns", "exec", host.namespace, "ip", *args)
        yield made
    finally:
        for host in made.values():
            _stop(host)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, check=False)
            shutil.rmtree(host.temp_dir, ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


def _stop(host: Host, grace_s: float = 20.0) -> None:
    """SIGTERM the host's processes (Ray's `start --block` takes its children down), then kill
    whatever still runs in the namespace."""
    for process in host.processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in host.processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    leftover = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True, check=False).stdout.split()
    for pid in leftover:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
