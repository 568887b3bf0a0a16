"""Output deltas from LLM replicas to API replicas: one message per engine step per API replica.

A request still goes to an LLM replica as one Serve handle call (`LLMDeployment.generate`): Serve
picks the replica, counts the call against its queue limit and autoscaling, cancels it when the
client goes (which aborts the request) and fails it when the replica dies. But its tokens do not
come back as one Ray streaming item each. Every API replica listens on a TCP port of its own
(`DeltaChannel`) and passes its address and a secret with each call; each LLM replica keeps one
connection to each API replica that has requests on it (`Outbox`), and after every engine step
writes one msgpack message holding every such request's new tokens and text. The API replica reads
it in one callback and hands each request's delta to that request's `Mailbox`, which the HTTP
stream reads. A mailbox whose reader is behind merges what arrives into the delta it holds, so a
slow client costs one pending delta, never a queue of one object per token; an outbox whose
connection cannot take more (the API replica is behind) does the same with whole messages.

The handle call returns only after the message with its request's end has been written to the
connection, so when it returns normally that message is on its way; the API side waits for it
(a while, `FINISH_GRACE_S`) before calling the request lost.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass

import msgpack

from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.errors import LLMClusterError
from serving.server.messages import DeltaTracker, GenerationDelta, WireEntry, from_wire, merge_wire, to_wire

logger = logging.getLogger(__name__)

FINISH_GRACE_S = 30.0  # how long the API waits for a request's last delta after its call returned
HELLO_TIMEOUT_S = 10.0  # a connection that has not shown the secret by then is closed
# what an outbox lets sit in its connection's buffer before it stops writing and merges instead
HIGH_WATER_BYTES, LOW_WATER_BYTES = 4 << 20, 1 << 20


class ChannelError(LLMClusterError):
    """The connection between an LLM replica and an API replica broke under a request."""


@dataclass(frozen=True)
class ChannelAddress:
    """Where an API replica takes its deltas, and the secret an LLM replica shows first."""

    host: str
    port: int
    secret: str


# API replica side


class Mailbox:
    """One request's deltas as they arrive; what its reader has not taken yet is merged into one delta."""

    __slots__ = ("_waiter", "error", "finished", "pending", "seen_on")

    def __init__(self) -> None:
        self.pending: GenerationDelta | None = None
        self.finished = False  # the request's last delta has arrived (it may still be pending)
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.seen_on: _Receiver | None = None  # the connection its deltas come on, once one has

    def push(self, finished: bool, delta: GenerationDelta) -> None:
        self.pending = delta if self.pending is None else self.pending.merge(delta)
        self.finished = self.finished or finished
        self.wake()

    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.finished:
            self.error = error
            self.wake()

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take(self) -> GenerationDelta | None:
        delta, self.pending = self.pending, None
        return delta

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until something arrives, the request fails, `wake` is called, or `timeout_s` passes."""
        if self.pending is not None or self.error is not None:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            if timeout_s is None:
                await self._waiter
            else:
                await asyncio.wait_for(self._waiter, timeout_s)
        finally:
            self._waiter = None


class DeltaChannel:
    """The API replica's end: a TCP server the LLM replicas connect to, and a mailbox per request in flight."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.secret = secrets.token_hex(16)
        self.address: ChannelAddress | None = None
        self.mailboxes: dict[str, Mailbox] = {}
        self._server: asyncio.AbstractServer | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> ChannelAddress:
        async with self._starting:
            if self.address is None:
                loop = asyncio.get_running_loop()
                self._server = await loop.create_server(lambda: _Receiver(self), self.host, 0)
                port = self._server.sockets[0].getsockname()[1]
                self.address = ChannelAddress(self.host, port, self.secret)
        return self.address

    def open(self, request_id: str) -> Mailbox:
        mailbox = self.mailboxes[request_id] = Mailbox()
        return mailbox

    def close(self, request_id: str) -> None:
        self.mailboxes.pop(request_id, None)

    def deliver(self, receiver: _Receiver, entries: list[WireEntry]) -> None:
        mailboxes = self.mailboxes
        for entry in entries:
            mailbox = mailboxes.get(entry[0])
            if mailbox is None:  # its client left: the call was cancelled, the replica aborts it
                continue
            _, finished, delta = from_wire(entry)
            mailbox.seen_on = receiver
            mailbox.push(finished, delta)

    def lost(self, receiver: _Receiver) -> None:
        for mailbox in self.mailboxes.values():
            if mailbox.seen_on is receiver:
                mailbox.fail(ChannelError("the connection to the LLM replica broke"))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


class _Receiver(asyncio.Protocol):
    def __init__(self, channel: DeltaChannel) -> None:
        self.channel = channel
        self.unpacker = msgpack.Unpacker(strict_map_key=False)  # logprobs map token ids (ints) to floats
        self.transport: asyncio.Transport | None = None
        self.greeted = False
        self.received = 0  # bytes before the secret was shown
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self._no_hello)

    def _no_hello(self) -> None:
        if not self.greeted and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.greeted:  # nothing is unpacked past the secret until it has been shown
            self.unpacker.feed(data)
            try:
                hello = next(self.unpacker)
            except StopIteration:
                self.received += len(data)
                if self.received > 1024:  # far longer than a secret
                    self.transport.close()
                return
            except Exception:  # noqa: BLE001 - not our peer
                self.transport.close()
                return
            if not isinstance(hello, str) or not hmac.compare_digest(hello, self.channel.secret):
                self.transport.close()
                return
            self.greeted = True
            self._hello_timer.cancel()
        else:
            self.unpacker.feed(data)
        deliver = self.channel.deliver
        for entries in self.unpacker:
            deliver(self, entries)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self.greeted:
            self.channel.lost(self)


# LLM replica side


class Outbox:
    """An LLM replica's end of one API replica's channel: gathers a step's deltas of every request of that API
    replica and writes them as one message once the step's outputs are all in (`flush`, an `on_step` callback)."""

    def __init__(self, address: ChannelAddress, engine: AsyncLLMEngine) -> None:
        self.address = address
        self.engine = engine
        self.pending: dict[str, WireEntry] = {}  # request id -> what it has not sent yet
        self.finish_waiters: dict[str, asyncio.Future[None]] = {}  # resolved once its last delta is written
        self.broken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._remove_callback = engine.on_step(self.flush)
        self._connecting = asyncio.ensure_future(self._connect())

    @property
    def usable(self) -> bool:
        return not self.broken.done()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(lambda: _Sender(self), self.address.host, self.address.port)
        except OSError as error:
            self.fail(ChannelError(f"cannot reach the API replica at {self.address.host}:{self.address.port}: {error}"))
            return
        transport.set_write_buffer_limits(HIGH_WATER_BYTES, LOW_WATER_BYTES)
        transport.write(msgpack.packb(self.address.secret))
        self._transport = transport
        self.flush()

    async def send(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> None:
        """Run the request on the engine with its deltas going out on this channel; returns once its last delta has
        been written. Cancelling aborts it; so does the channel breaking (raises ChannelError)."""
        tracker = DeltaTracker()

        def sink(output: RequestOutput) -> None:
            entry = to_wire(request_id, output.finished, tracker.delta(output))
            earlier = self.pending.get(request_id)
            self.pending[request_id] = entry if earlier is None else merge_wire(earlier, entry)

        written = self.finish_waiters[request_id] = asyncio.get_running_loop().create_future()
        run = asyncio.ensure_future(self.engine.run(prompt_ids, params, request_id, sink))
        try:
            await asyncio.wait({run, self.broken}, return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                raise self.broken.exception() or ChannelError("the channel closed")
            run.result()  # the request's own error, if any
            self.flush()  # normally its end went out with its step already
            await asyncio.wait({written, self.broken}, return_when=asyncio.FIRST_COMPLETED)
            if not written.done():
                raise self.broken.exception() or ChannelError("the channel closed")
        finally:
            if not run.done():
                run.cancel()  # aborts the request on the engine
                await asyncio.gather(run, return_exceptions=True)
            self.finish_waiters.pop(request_id, None)
            if not written.done():
                self.pending.pop(request_id, None)

    def flush(self) -> None:
        if not self.pending or self._transport is None or self._paused or self.broken.done():
            return
        entries = list(self.pending.values())
        self.pending = {}
        self._transport.write(msgpack.packb(entries))
        for entry in entries:
            if entry[1] and (waiter := self.finish_waiters.get(entry[0])) is not None and not waiter.done():
                waiter.set_result(None)

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.flush()

    def fail(self, error: BaseException) -> None:
        if not self.broken.done():
            self.broken.set_exception(error)
            self.broken.exception()  # retrieved: nobody may be waiting on it
        self._remove_callback()
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self.fail(ChannelError("the replica is closing its channels"))


class _Sender(asyncio.Protocol):
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def pause_writing(self) -> None:
        self.outbox.pause()

    def resume_writing(self) -> None:
        self.outbox.resume()

    def data_received(self, data: bytes) -> None:  # the API side sends nothing
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.outbox.fail(ChannelError(f"the connection to the API replica closed{f': {exc}' if exc else ''}"))


class Outboxes:
    """An LLM replica's outboxes, one per API replica channel, made on its first request and again after a break."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self._outboxes: dict[ChannelAddress, Outbox] = {}

    def get(self, address: ChannelAddress) -> Outbox:
        outbox = self._outboxes.get(address)
        if outbox is None or not outbox.usable:
            outbox = self._outboxes[address] = Outbox(address, self.engine)
        return outbox
