"""The LLM deployment as the API's backend: handle calls whose deltas come on a channel, an admission count, Ray's errors unwrapped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serving.config import ServerConfig
from serving.engine.sampling_params import SamplingParams
from serving.errors import InvalidRequestError, LLMClusterError
from serving.server.channel import FINISH_GRACE_S, ChannelError, DeltaChannel, Mailbox
from serving.server.http_errors import overloaded, replica_failed
from serving.server.messages import GenerationDelta, ModelInfo


class ServeLLMClient:
    """The LLM deployment as the API's backend: handle calls whose deltas arrive on this replica's channel, with
    Ray's errors unwrapped."""

    def __init__(self, handle: DeploymentHandle, server: ServerConfig) -> None:
        # Ray actor calls (_by_reference), not Serve's gRPC transport between replicas, its default where
        # RAY_SERVE_THROUGHPUT_OPTIMIZED is set: benchmarks/README.md says why.
        self._handle = handle.options(_by_reference=True)
        # the replicas send the deltas of this replica's requests here, one message per engine step
        self._channel = DeltaChannel(ray.util.get_node_ip_address())
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
        """The request's deltas as they arrive on this replica's channel; each is what arrived since the last one
        was taken, so a reader that falls behind gets fewer, larger deltas (serving/server/channel.py)."""
        address = await self._channel.start()
        with self._admitted(), self._errors():
            mailbox = self._channel.open(request_id)
            response = self._handle.generate.remote(prompt_ids, params, request_id, address)
            call = asyncio.ensure_future(_result(response))
            call.add_done_callback(lambda _: mailbox.wake())
            try:
                while True:
                    await mailbox.wait()
                    if (delta := mailbox.take()) is not None:
                        yield delta
                        if mailbox.finished and mailbox.pending is None:
                            break
                    elif mailbox.error is not None:
                        raise mailbox.error
                    elif call.done():
                        await self._ended(call, mailbox)
                # the stream is whole; the call returns in a moment, once the replica has let the request go. Until
                # then Serve counts it against the replica's limit, so this replica's admission count keeps it too.
                await asyncio.wait({call}, timeout=FINISH_GRACE_S)
            except BaseException:  # closed early (client gone), cancelled or failed: abort it on its replica
                response.cancel()
                raise
            finally:
                self._channel.close(request_id)
                call.add_done_callback(_drop_result)  # whatever it still ends with is no longer this request's

    @staticmethod
    async def _ended(call: asyncio.Future, mailbox: Mailbox) -> None:
        """The call returned before the request's last delta arrived: raise its error, or wait for the delta, which
        the LLM replica wrote before returning."""
        result = call.result()  # raises what the call raised
        if isinstance(result, InvalidRequestError):
            raise result
        try:
            await mailbox.wait(FINISH_GRACE_S)
        except TimeoutError:
            raise ChannelError(f"the request's last output did not arrive within {FINISH_GRACE_S:.0f} s of its end") from None

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
        except ChannelError as error:  # the connection the replica sends deltas on broke (it died, most likely)
            raise replica_failed() from error
        except RayTaskError as error:
            if isinstance(error.cause, LLMClusterError):
                raise error.cause from None
            raise


async def _result(response):  # a DeploymentResponse as a coroutine, for a task
    return await response


def _drop_result(call: asyncio.Future) -> None:
    if not call.cancelled():
        call.exception()  # retrieved, so asyncio does not log it as never retrieved
