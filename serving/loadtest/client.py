"""Send one streaming request to an OpenAI-compatible server and time every chunk of its answer."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp

from serving.loadtest.workloads import RequestSpec
from serving.tokenizer import Tokenizer

Endpoint = Literal["completions", "chat"]


@dataclass
class RequestResult:
    """What happened to one request. Times are perf_counter seconds; chunk times count from `start`."""

    prompt_len: int
    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried output
    output_len: int = 0  # generated tokens: the server's usage count, else counted from the text
    error: str | None = None  # the kind of failure (e.g. "http_503", "timeout"); None when it succeeded
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class Target(Protocol):
    """Where requests go: an HTTP server, or an engine in this process."""

    async def send(self, spec: RequestSpec) -> RequestResult: ...

    async def close(self) -> None: ...


class HTTPTarget:
    """Streams /v1/completions or /v1/chat/completions with greedy sampling and (by default) ignore_eos."""

    def __init__(
        self,
        base_url: str,
        model: str,
        endpoint: Endpoint = "completions",
        api_key: str | None = None,
        ignore_eos: bool = True,
        extra_body: dict[str, Any] | None = None,
        tokenizer: Tokenizer | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        """`tokenizer` counts output tokens when the server sends no usage; without one, chunks are counted."""
        self.url = f"{base_url.rstrip('/')}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        self.model, self.endpoint, self.ignore_eos = model, endpoint, ignore_eos
        self.extra_body = extra_body or {}
        self.tokenizer = tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        connector = aiohttp.TCPConnector(limit=0)  # the load shape, not the client, decides concurrency
        self.session = aiohttp.ClientSession(headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": spec.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            if not isinstance(spec.prompt, str):
                raise ValueError("the chat endpoint takes text prompts, not token ids")
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            body["prompt"] = spec.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body | self.extra_body

    async def send(self, spec: RequestSpec) -> RequestResult:
        result = RequestResult(spec.prompt_len, start=time.perf_counter())
        texts: list[str] = []
        usage: int | None = None
        try:
            async with self.session.post(self.url, json=self.body(spec)) as response:
                if response.status != 200:
                    result.error, result.detail = f"http_{response.status}", (await response.text())[:300]
                    return _finish(result)
                # what arrived in one read is timed once, and parsed as a whole: the client's work per token is
                # one json.loads, so it measures the server and not itself (its CPU time is in each point's summary)
                rest = b""
                async for data in response.content.iter_any():
                    arrived = time.perf_counter() - result.start
                    *events, rest = (rest + data).replace(b"\r\n", b"\n").split(b"\n\n")
                    for raw in events:
                        payload = _sse_payload(raw)
                        if payload is None:
                            continue
                        if payload == b"[DONE]":
                            break
                        event = json.loads(payload)
                        if "error" in event:
                            result.error, result.detail = "stream_error", str(event["error"])[:300]
                            return _finish(result)
                        if event.get("usage"):
                            usage = event["usage"].get("completion_tokens")
                        text = _chunk_text(event)
                        if text:
                            result.chunk_times.append(arrived)
                            texts.append(text)
        except TimeoutError:
            result.error = "timeout"
        except aiohttp.ClientError as error:
            result.error, result.detail = "connection", repr(error)[:300]
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            result.error, result.detail = "bad_stream", repr(error)[:300]
        if result.ok and not result.chunk_times:
            result.error = "no_output"
        result.output_len = usage if usage is not None else self._count("".join(texts), len(result.chunk_times))
        return _finish(result)

    def _count(self, text: str, chunks: int) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if self.tokenizer else chunks

    async def close(self) -> None:
        await self.session.close()


async def fetch_model(base_url: str, api_key: str | None = None) -> str:
    """The first model the server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(headers=headers, timeout=timeout) as session,
        session.get(f"{base_url.rstrip('/')}/v1/models") as response,
    ):
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


def _finish(result: RequestResult) -> RequestResult:
    result.end = time.perf_counter()
    return result


def _sse_payload(event: bytes) -> bytes | None:
    """The data of one server-sent event (its `data:` lines joined), None for an event without any."""
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _chunk_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""
