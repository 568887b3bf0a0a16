"""Free TCP ports on 127.0.0.1 for the servers and Ray processes tests start (never a fixed port:
other test runs and clusters may share the machine)."""

from __future__ import annotations

import socket

from cluster.local import free_port, free_ports

__all__ = ["HOST", "free_port", "free_ports", "listening"]
HOST = "127.0.0.1"


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0
