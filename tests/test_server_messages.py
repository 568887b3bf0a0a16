"""What LLM replicas send to the API: engine outputs as deltas, on the real tiny engine (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from serving.config import EngineConfig, LLMConfig, ModelConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.server.messages import GenerationDelta, engine_deltas


@pytest.fixture(scope="module")
def engine(tiny_model) -> AsyncLLMEngine:
    config = LLMConfig(model=ModelConfig(source=str(tiny_model)), engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.02))
    return AsyncLLMEngine(config)


def collect(engine: AsyncLLMEngine, prompt: str, params: SamplingParams) -> tuple[list[GenerationDelta], object]:
    """The deltas of one request, and the engine's own outputs of the same request run again."""

    async def run():
        deltas = [d async for d in engine_deltas(engine.generate(prompt, params))]
        outputs = [o async for o in engine.generate(prompt, params)]
        return deltas, outputs[-1]

    return asyncio.run(run())


def test_deltas_add_up_to_the_whole_output(engine):
    params = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=5, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    deltas, final = collect(engine, "Hello there", params)
    assert deltas[0].prompt_logprobs == final.prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    assert all(d.num_prompt_tokens == len(final.prompt_token_ids) for d in deltas)
    merged = deltas[0]
    for delta in deltas[1:]:
        merged = merged.merge(delta)
    assert merged.prompt_logprobs == final.prompt_logprobs
    for choice, expected in zip(merged.choices, final.outputs):
        assert (choice.index, choice.text, choice.token_ids) == (expected.index, expected.text, expected.token_ids)
        assert choice.logprobs == expected.logprobs and choice.finish_reason == expected.finish_reason == "length"
    for index in (0, 1):  # each choice reports its finish once, and logprobs go with their tokens
        assert sum(c.finish_reason is not None for d in deltas for c in d.choices if c.index == index) == 1
        assert all(len(c.logprobs) == len(c.token_ids) for d in deltas for c in d.choices)


def test_stop_string_finishes_with_the_text_before_it(engine):
    probe, _ = collect(engine, "Count:", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    text = "".join(c.text for d in probe for c in d.choices)
    stop = text[5:8]
    deltas, final = collect(engine, "Count:", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))
    assert "".join(c.text for d in deltas for c in d.choices) == final.outputs[0].text == text[: text.index(stop)]
    assert deltas[-1].choices[-1].finish_reason == "stop"


def test_closing_the_deltas_aborts_the_request(engine):
    async def scenario():
        stream = engine_deltas(engine.generate("abandon me", SamplingParams(max_tokens=400, ignore_eos=True)))
        await anext(stream)
        assert engine.engine.num_running == 1 and engine.engine.blocks.usage > 0
        await stream.aclose()

    asyncio.run(scenario())
    assert engine.engine.num_running == 0 and engine.engine.blocks.usage == 0
    assert not engine.engine.has_unfinished_requests()
