"""Ports for the servers and clusters the benchmarks start on this machine."""
from __future__ import annotations

from cluster.local import free_ports


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    return free_ports(1)[0]
