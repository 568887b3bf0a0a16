"""AsyncLLMEngine's snapshot: what metrics, autoscaling and health read from other threads, published under the
step lock after each step, added request and abort (real tiny engine, no Ray)."""

from __future__ import annotations

import asyncio

from serving.config import EngineConfig, LLMConfig, ModelConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams


def test_the_snapshot_follows_requests_in_and_out(tiny_model):
    config = LLMConfig(model=ModelConfig(source=str(tiny_model)), engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.02))
    engine = AsyncLLMEngine(config)
    seen = []

    async def scenario():
        long = engine.generate("keep going", SamplingParams(max_tokens=400, ignore_eos=True))
        await anext(long)
        seen.append(engine.snapshot)
        short = [o async for o in engine.generate("short", SamplingParams(max_tokens=3, ignore_eos=True))]
        assert short[-1].finished
        await long.aclose()  # aborts it
        seen.append(engine.snapshot)

    asyncio.run(scenario())
    busy, idle = seen
    assert busy.num_running == 1 and busy.kv_cache_usage > 0 and busy.has_unfinished_requests
    assert busy.prefix_cache_queries > 0
    assert idle.num_running == idle.num_waiting == 0 and idle.kv_cache_usage == 0 and not idle.has_unfinished_requests
    assert engine.seconds_without_progress() == 0.0
