"""cluster/haproxy.py: Serve's HAProxy, started through `llmcluster-haproxy`, passes on every client that gives
up on a non-streamed request. With Serve's `option splice-request` and splicing on, about a third of them
left the backend connection open (measured: 10 and 9 of 30)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from ports import HOST, free_port, listening

from cluster.haproxy import BINARY_ENV, haproxy_env

CLIENTS = 12
CONFIG = """\
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout http-keep-alive 90s
    option abortonclose
    option splice-request
    option splice-response
    option http-no-delay
    option idle-close-on-response
frontend http_frontend
    bind {host}:{frontend}
    use_backend replicas
backend replicas
    http-reuse always
    server replica {host}:{backend}
"""


class Backend:
    """An HTTP server that answers no POST; it records, per request, whether the connection closed within 5 s."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.closed: list[bool] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True).start()
        self.ready.wait(10)

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._handle, HOST, self.port)
        self.ready.set()
        async with server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        try:
            closed = await asyncio.wait_for(reader.read(1), 5) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        self.closed.append(closed)
        writer.close()


@pytest.fixture
def ingress(tmp_path: Path) -> Iterator[tuple[str, Backend]]:
    backend = Backend(free_port())
    frontend = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.format(host=HOST, frontend=frontend, backend=backend.port))
    process = subprocess.Popen([haproxy_env()[BINARY_ENV], "-db", "-f", str(config)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not listening(frontend):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
            time.sleep(0.05)
        yield f"http://{HOST}:{frontend}", backend
    finally:
        process.terminate()
        process.wait(10)


def test_the_command_runs_serves_haproxy():
    binary = haproxy_env()[BINARY_ENV]
    assert Path(binary).name == "llmcluster-haproxy" and shutil.which(binary)
    assert "HAProxy version" in subprocess.run([binary, "-v"], check=True, capture_output=True, text=True, timeout=30).stdout


def test_every_client_that_gives_up_closes_its_backend_connection(ingress):
    url, backend = ingress
    body = {"model": "m", "prompt": "Hi", "max_tokens": 800}  # a small body, as the API's requests are
    for _ in range(CLIENTS):
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{url}/v1/completions", json=body, timeout=(5, 0.3))
    deadline = time.monotonic() + 10
    while len(backend.closed) < CLIENTS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backend.closed == [True] * CLIENTS
