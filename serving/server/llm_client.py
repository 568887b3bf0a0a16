"""The LLM deployment as the API's backend: streaming handle calls, an admission count, Ray's errors unwrapped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serving.config import ServerConfig
from serving.engine.sampling_params import SamplingParams
from serving.errors import InvalidRequestError, LLMClusterError
from serving.server.http_errors import overloaded, replica_failed
from serving.server.messages import GenerationDelta, ModelInfo


class ServeLLMClient:
    """The LLM deployment as the API's backend: streaming handle calls, with Ray's errors unwrapped."""

    def __init__(self, handle: DeploymentHandle, server: ServerConfig) -> None:
        # Ray actor calls (_by_reference), not Serve's gRPC transport between replicas, its default where
        # RAY_SERVE_THROUGHPUT_OPTIMIZED is set: benchmarks/README.md says why.
        self._handle = handle.options(_by_reference=True)
        self._streaming = self._handle.options(stream=True)
        self._retry_after_s = server.retry_after_s
        self._info: ModelInfo | None = None
        # Serve's handle checks its queue limit before it counts a request as queued, with an await in between
        # (Router.assign_request): a burst passes the check together (docs/resilience.md). So this replica also counts
        # the calls it has at the LLM deployment, running or queued, and refuses past what Serve would take with every
        # replica up; below max_replicas Serve's limit is the tighter.
        self._calls = 0
        self._max_calls = server.max_ongoing_requests * server.max_replicas + server.max_queued_requests

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            with self._errors():
                self._info = await self._handle.model_info.remote()
        return self._info

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationDelta]:
        with self._admitted(), self._errors():
            response = self._streaming.generate.remote(prompt_ids, params, request_id)
            try:
                async for delta in response:
                    if isinstance(delta, InvalidRequestError):
                        raise delta
                    yield delta
            except BaseException:  # closed early (client gone), cancelled or failed: abort it on its replica
                response.cancel()
                raise

    async def complete(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenerationDelta:
        with self._admitted(), self._errors():
            response = self._handle.complete.remote(prompt_ids, params, request_id)
            try:
                result = await response
            except asyncio.CancelledError:
                response.cancel()
                raise
        if isinstance(result, InvalidRequestError):
            raise result
        return result

    async def check_health(self) -> None:
        with self._errors():
            await self._handle.check_health.remote()

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """One call to the LLM deployment, refused with 503 when this replica already has all it may."""
        if self._calls >= self._max_calls:
            raise overloaded(self._retry_after_s)
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except BackPressureError as error:
            raise overloaded(self._retry_after_s) from error
        except RayActorError as error:  # the replica died under the request, or was stopped as unhealthy
            raise replica_failed() from error
        except RayTaskError as error:
            if isinstance(error.cause, LLMClusterError):
                raise error.cause from None
            raise
