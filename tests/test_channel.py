"""The channel LLM replicas send deltas on (serving/server/channel.py), both ends in one process on the real tiny
engine, no Ray: one message per step for all requests, deltas that add up to the engine's outputs, a slow
reader's deltas merged, aborts, refused strangers and broken connections."""

from __future__ import annotations

import asyncio
import socket

import msgpack
import pytest

from serving.config import EngineConfig, LLMConfig, ModelConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.server.channel import ChannelAddress, ChannelError, DeltaChannel, Outboxes, _Receiver
from serving.server.messages import GenerationDelta, engine_deltas


@pytest.fixture(scope="module")
def engine(tiny_model) -> AsyncLLMEngine:
    config = LLMConfig(model=ModelConfig(source=str(tiny_model)), engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.02))
    return AsyncLLMEngine(config)


class Counted(DeltaChannel):
    """Counts the messages (engine steps' worth of deltas) it receives."""

    messages = 0

    def deliver(self, receiver: _Receiver, entries: list) -> None:
        self.messages += 1
        super().deliver(receiver, entries)


async def read(channel: DeltaChannel, send: asyncio.Future, request_id: str, pause_s: float = 0.0) -> list[GenerationDelta]:
    """A request's deltas from its mailbox until its end, sleeping `pause_s` after each (a slow reader)."""
    mailbox, deltas = channel.mailboxes[request_id], []
    while True:
        await mailbox.wait(30)
        if mailbox.error is not None:
            raise mailbox.error
        if (delta := mailbox.take()) is not None:
            deltas.append(delta)
            if mailbox.finished and mailbox.pending is None:
                await send
                return deltas
        await asyncio.sleep(pause_s)


def merged(deltas: list[GenerationDelta]) -> GenerationDelta:
    whole = deltas[0]
    for delta in deltas[1:]:
        whole = whole.merge(delta)
    return whole


def test_all_requests_of_a_step_travel_as_one_message_and_add_up(engine):
    params = SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=3, logprobs=2, ignore_eos=True)
    prompts = [f"request number {i}" for i in range(6)]

    async def scenario():
        channel = Counted("127.0.0.1")
        address = await channel.start()
        outboxes = Outboxes(engine)
        for i in range(len(prompts)):
            channel.open(f"r{i}")
        sends = [asyncio.ensure_future(outboxes.get(address).send(p, params, f"r{i}")) for i, p in enumerate(prompts)]
        got = await asyncio.gather(*(read(channel, s, f"r{i}") for i, s in enumerate(sends)))
        direct = [[d async for d in engine_deltas(engine.generate(p, params))] for p in prompts]
        outboxes.get(address).close()
        await channel.stop()
        return channel.messages, got, direct

    messages, got, direct = asyncio.run(scenario())
    for deltas, reference in zip(got, direct):
        # the same tokens and text; logprobs within float noise (batched with others here, alone there)
        for ours, theirs in zip(merged(deltas).choices, merged(reference).choices):
            assert (ours.index, ours.text, ours.token_ids, ours.finish_reason) == (
                theirs.index,
                theirs.text,
                theirs.token_ids,
                theirs.finish_reason,
            )
            assert [lp for lp, _ in ours.logprobs] == pytest.approx([lp for lp, _ in theirs.logprobs], abs=1e-4)
            assert [list(top) for _, top in ours.logprobs] == [list(top) for _, top in theirs.logprobs]
        assert sum(c.finish_reason is not None for d in deltas for c in d.choices) == 2
    # 6 requests x 16 tokens, mostly stepped together: far fewer messages than deltas
    assert messages < sum(len(d) for d in got) / 3, messages


def test_a_slow_reader_gets_merged_deltas_and_holds_up_nobody(engine):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def scenario():
        channel = DeltaChannel("127.0.0.1")
        address = await channel.start()
        outboxes = Outboxes(engine)
        channel.open("slow"), channel.open("fast")
        slow = asyncio.ensure_future(outboxes.get(address).send("slow reader", params, "slow"))
        fast = asyncio.ensure_future(outboxes.get(address).send("fast reader", params, "fast"))
        result = await asyncio.gather(read(channel, slow, "slow", pause_s=0.2), read(channel, fast, "fast"))
        outboxes.get(address).close()
        await channel.stop()
        return result

    slow, fast = asyncio.run(scenario())
    assert len(slow) < len(fast) / 2, (len(slow), len(fast))  # few deltas, each merging several steps' tokens
    assert len(merged(slow).choices[0].token_ids) == len(merged(fast).choices[0].token_ids) == 40


def test_cancelling_a_send_aborts_its_request(engine):
    async def scenario():
        channel = DeltaChannel("127.0.0.1")
        address = await channel.start()
        channel.open("gone")
        send = asyncio.ensure_future(
            Outboxes(engine).get(address).send("abandon me", SamplingParams(max_tokens=400, ignore_eos=True), "gone")
        )
        mailbox = channel.mailboxes["gone"]
        await mailbox.wait(30)
        assert mailbox.take() is not None and engine.engine.num_running == 1
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
        await channel.stop()

    asyncio.run(scenario())
    assert engine.engine.num_running == 0 and engine.engine.blocks.usage == 0


def test_a_stranger_without_the_secret_is_refused():
    async def scenario():
        channel = DeltaChannel("127.0.0.1")
        address = await channel.start()
        channel.open("r")
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(msgpack.packb("not the secret") + msgpack.packb([["r", True, 1, None, [[0, "forged", [1], None, "stop"]]]]))
        await writer.drain()
        assert await reader.read() == b""  # closed on us
        assert channel.mailboxes["r"].pending is None
        await channel.stop()

    asyncio.run(scenario())


def test_a_broken_connection_fails_the_requests_on_both_ends(engine):
    async def scenario():
        channel = DeltaChannel("127.0.0.1")
        address = await channel.start()
        channel.open("r")
        outbox = Outboxes(engine).get(address)
        send = asyncio.ensure_future(outbox.send("keep going", SamplingParams(max_tokens=400, ignore_eos=True), "r"))
        mailbox = channel.mailboxes["r"]
        await mailbox.wait(30)
        outbox._transport.abort()  # the connection drops (a replica died, a network fault)
        with pytest.raises(ChannelError):
            await send
        await asyncio.wait_for(mailbox.wait(), 10)
        assert isinstance(mailbox.error, ChannelError)
        await channel.stop()

    asyncio.run(scenario())
    assert engine.engine.num_running == 0 and engine.engine.blocks.usage == 0


def test_an_unreachable_api_replica_fails_the_request(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it is closed

    async def scenario():
        outbox = Outboxes(engine).get(ChannelAddress("127.0.0.1", port, "x"))
        with pytest.raises(ChannelError):
            await outbox.send("nobody hears", SamplingParams(max_tokens=400, ignore_eos=True), "r")

    asyncio.run(scenario())
    assert engine.engine.num_running == 0
