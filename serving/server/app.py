"""The FastAPI app of the OpenAI-compatible API; the Serve ingress deployment runs one per replica."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.metrics_core import Metric
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.config import ServerConfig
from serving.metrics import CONTENT_TYPE
from serving.metrics.api import APIMetrics
from serving.metrics.export import merge, render
from serving.server.auth import SCOPE_KEY, APIKeys, RequireAPIKey
from serving.server.http_errors import APIError, internal_error
from serving.server.openai_api import LLMBackend, OpenAIServing
from serving.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from serving.server.rate_limit import RateLimiter

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

PROBE_TIMEOUT_S = 10.0  # how long /health waits for an LLM replica to answer


def create_app(
    backend: LLMBackend,
    config: ServerConfig,
    metrics: APIMetrics,
    cluster_metrics: Callable[[], Awaitable[list[Metric]]],
    keys: APIKeys,
) -> FastAPI:
    """The API; GET /metrics answers `metrics` and what `cluster_metrics` gathers from every other process.
    With `server.auth.require_api_key`, every route but /health needs one of `keys`."""
    serving = OpenAIServing(backend, config.limits, RateLimiter(config.auth))
    app = FastAPI(title="llm-cluster", summary="OpenAI-compatible LLM inference on Ray")
    app.add_middleware(_LimitBody, max_bytes=config.limits.max_body_bytes)
    if config.auth.require_api_key:
        app.add_middleware(RequireAPIKey, keys=keys)  # outside the body limit: no key, no reading
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app, config, metrics)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return await serving.models()

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request) -> Response:
        return _respond(await serving.completions(request, getattr(http.state, SCOPE_KEY, None)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Response:
        return _respond(await serving.chat(request, getattr(http.state, SCOPE_KEY, None)))

    @app.post("/tokenize")
    async def tokenize(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        """vLLM's: `prompt`, or `messages` rendered with the chat template, to token ids."""
        request = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
        return await serving.tokenize(_validate(request, body))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's: token ids to text."""
        return await serving.detokenize(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine is alive and makes progress on the work it has, else 503."""
        try:
            await asyncio.wait_for(backend.check_health(), PROBE_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - whatever the fault, the answer is "unhealthy"
            return JSONResponse({"status": "unhealthy", "detail": str(error) or type(error).__name__}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        families = merge([*metrics.registry.collect(), *await cluster_metrics()])
        return Response(render(families), media_type=CONTENT_TYPE)

    return app


def _validate(model: type[T], body: dict[str, Any]) -> T:
    """`model` from a body read as a plain object, failing as FastAPI's own body validation does."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise RequestValidationError([e | {"loc": ("body", *e["loc"])} for e in error.errors()]) from None


def _respond(result: dict[str, Any] | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_error_handlers(app: FastAPI, config: ServerConfig, metrics: APIMetrics) -> None:
    """Every error leaves in OpenAI's format; only unexpected exceptions are 500s."""

    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, APIError)
        if error.code == "overloaded":
            metrics.rejected.inc()
        elif error.code == "rate_limit_exceeded":
            metrics.rate_limited.inc()
        return error.response()

    async def validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return _validation_error(error).response()

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if error.status_code == 413:  # a chunked body that grew too large
            return _too_large(config.limits.max_body_bytes).response()
        if error.status_code == 400:  # FastAPI could not read the body: not UTF-8, or not text at all
            return APIError(400, "the request body is not valid UTF-8 JSON", code="invalid_json").response()
        kind = "server_error" if error.status_code >= 500 else "invalid_request_error"
        message = f"{error.detail}: {request.method} {request.url.path}"
        return APIError(error.status_code, message, type=kind, headers=error.headers).response()

    async def unexpected_error(request: Request, error: Exception) -> Response:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return internal_error().response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)


def _validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming the first offending top-level field, with every problem in the message."""
    problems, param = [], None
    for e in error.errors():
        loc = [str(part) for part in e["loc"][1:]]  # drop "body"
        if e["type"] == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", code="invalid_json")
        if e["type"] == "extra_forbidden":
            problems.append(f"unsupported parameter: {'.'.join(loc)}")
        else:
            problems.append(f"{'.'.join(loc) or 'body'}: {e['msg']}")
        if param is None and loc:
            param = loc[0]
    return APIError(400, "; ".join(problems), param=param)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")


class _LimitBody:
    """ASGI middleware: 413 for a Content-Length over the limit before reading, or once a body grows past it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(self.max_bytes).response()(scope, receive, send)
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413)  # FastAPI passes HTTPExceptions from reading the body on to the handlers
            return message

        await self.app(scope, receive_within_limit, send)


class _CountRequests:
    """ASGI middleware counting answered requests by route template and status class, and timing them."""

    def __init__(self, app: ASGIApp, metrics: APIMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        started = time.monotonic()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.count_request(getattr(scope.get("route"), "path", "unmatched"), status, time.monotonic() - started)
