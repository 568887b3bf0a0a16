"""Free TCP ports on 127.0.0.1 for the servers and Ray processes tests start (never a fixed port:
other test runs and clusters may share the machine)."""
from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago (all held at once while choosing)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0
