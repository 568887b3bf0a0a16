"""Sampling, stopping, n > 1, preemption, abort, prefix caching and bad input on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from serving.config import EngineConfig, LLMConfig, ModelConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.llm import LLM
from serving.engine.model_runner import ModelRunner
from serving.engine.sampler import _apply_penalties
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Request
from serving.errors import ContextLengthError, InvalidRequestError, ModelSourceError, UnsupportedModelError


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02)


def generate_one(llm: LLM, prompt: str, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=20, temperature=1.3, ignore_eos=True)
    batch = llm.generate(["Other prompt", "Hello there", "Third"], [others, params, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    different = llm.generate(["Hello there"], SamplingParams(max_tokens=12, seed=99, ignore_eos=True), use_tqdm=False)
    assert different[0].outputs[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_and_min_p_1_are_greedy(llm):
    greedy = generate_one(llm, "abc", max_tokens=10, temperature=0, ignore_eos=True).outputs[0].token_ids
    for params in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        out = generate_one(llm, "abc", max_tokens=10, temperature=0.9, ignore_eos=True, **params)
        assert out.outputs[0].token_ids == greedy, params


def test_sampling_follows_the_distribution(llm):
    """Empirical first-token frequencies at temperature 1 match the model's softmax."""
    out = llm.generate(["The"] * 400, SamplingParams(max_tokens=1, logprobs=5, ignore_eos=True), use_tqdm=False)
    counts: dict[int, int] = {}
    for o in out:
        counts[o.outputs[0].token_ids[0]] = counts.get(o.outputs[0].token_ids[0], 0) + 1
    _, top = out[0].outputs[0].logprobs[0]
    for token, logprob in top.items():
        expected = torch.tensor(logprob).exp().item()
        assert abs(counts.get(token, 0) / 400 - expected) < 4 * (expected * (1 - expected) / 400) ** 0.5 + 0.01


def test_penalties_arithmetic(llm):
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    request = Request("r", None, [1, 2], params)
    sequence = llm.engine._new_sequence(request, 0, [1, 2, 3, 3])
    row = torch.tensor([1.0, 4.0, -2.0, 6.0, 1.0])
    _apply_penalties(row, sequence)
    # token 1: repetition 4/2; token 2: -2*2; token 3 (output twice): 6/2 - 0.25*2 - 0.5
    assert row.tolist() == [1.0, 2.0, -4.0, 2.0, 1.0]


def test_frequency_penalty_reduces_repetition(llm):
    plain = generate_one(llm, "1 1 1 1", max_tokens=30, temperature=0, ignore_eos=True).outputs[0].token_ids
    penalised = generate_one(llm, "1 1 1 1", max_tokens=30, temperature=0, ignore_eos=True, frequency_penalty=2.0).outputs[0].token_ids
    assert len(set(penalised)) > len(set(plain))


def test_stop_strings_tokens_and_lengths(llm):
    base = generate_one(llm, "hello", max_tokens=20, temperature=0, ignore_eos=True).outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    stop = base.text[5:7]
    cut = generate_one(llm, "hello", max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]).outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.find(stop)]
    kept = generate_one(llm, "hello", max_tokens=20, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True).outputs[
        0
    ]
    assert kept.text == base.text[: base.text.find(stop) + len(stop)]
    token = base.token_ids[3]
    by_token = generate_one(llm, "hello", max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[token]).outputs[0]
    assert by_token.token_ids == base.token_ids[: base.token_ids.index(token) + 1] and by_token.stop_reason == token


def test_n_completions_share_prompt_blocks(llm):
    engine = llm.engine
    prompt = "A prompt long enough to fill several blocks of four tokens"
    engine.add_request("n3", prompt, SamplingParams(n=3, max_tokens=8, seed=7, ignore_eos=True))
    engine.step()
    seqs = engine.requests["n3"].seqs
    assert len(seqs) == 3
    full = seqs[0].num_computed_tokens // 4
    assert seqs[1].block_table[:full] == seqs[0].block_table[:full] == seqs[2].block_table[:full]
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = outputs[-1]
    assert [c.index for c in final.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1
    assert engine.blocks.usage == 0


def test_preemption_recomputes_exactly(tiny_model):
    prompts = [f"Request number {i} asks for a long answer" for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    roomy = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02).generate(prompts, params, use_tqdm=False)
    # 60 blocks of 4 tokens: not enough for 6 sequences of ~50 tokens at once
    bytes_per_block = 2 * 3 * 2 * 16 * 4 * 4
    cramped = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=60 * bytes_per_block / 2**30, max_model_len=128)
    tight = cramped.generate(prompts, params, use_tqdm=False)
    assert cramped.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    assert cramped.engine.blocks.usage == 0


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    engine.add_request("long", "Generate a lot of text please", SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.blocks.usage > 0
    final = engine.abort_request("long")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.blocks.usage == 0 and not engine.has_unfinished_requests()


def test_logprobs_and_prompt_logprobs_shapes(llm):
    out = generate_one(llm, "Hello world", max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2)
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids)
    assert all(len(top) == 3 for _, top in completion.logprobs)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(len(entry[1]) == 2 for entry in out.prompt_logprobs[1:])
    # the greedy token is the most likely one
    for token, (chosen, top) in zip(completion.token_ids, completion.logprobs):
        assert chosen == pytest.approx(max(top.values()))


@pytest.mark.parametrize(
    "params, param",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(logprobs=50), "logprobs"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_sampling_values(params, param):
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**params)
    assert error.value.param == param


def test_bad_prompts_leave_the_engine_serving(llm):
    engine = llm.engine
    engine.add_request("good", "still fine", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    with pytest.raises(ContextLengthError, match=r"512 tokens.*\b(\d+) were requested"):
        engine.add_request("long", "word " * 600, SamplingParams(max_tokens=10))
    with pytest.raises(ContextLengthError, match="512"):
        engine.add_request("too-many", "hi", SamplingParams(max_tokens=5000))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", "", SamplingParams())
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request("ids", [1, 10**9], SamplingParams())
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 30


def test_unknown_architecture_and_missing_files(tmp_path, tiny_model):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="safetensors"):
        LLM(str(folder))
    with pytest.raises(ModelSourceError):
        LLM(str(tmp_path / "does-not-exist"))


def test_async_engine_streams_and_aborts(tiny_model):
    engine = AsyncLLMEngine(
        LLMConfig(model=ModelConfig(source=str(tiny_model)), engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.02))
    )

    async def scenario():
        params = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)
        deltas, final = [], None
        async for output in engine.generate("stream me", params):
            deltas.append(output.outputs[0].text_delta)
            final = output
        assert final.finished and "".join(deltas) == final.outputs[0].text
        # two concurrent streams, one closed early: its blocks are freed
        long_params = SamplingParams(max_tokens=400, ignore_eos=True)
        stream = engine.generate("abandoned", long_params)
        await stream.__anext__()
        other = asyncio.create_task(_collect(engine.generate("kept", params)))
        await stream.aclose()
        kept = await other
        assert kept.finished and len(kept.outputs[0].token_ids) == 25
        assert engine.engine.blocks.usage == 0 and not engine.engine.has_unfinished_requests()

    asyncio.run(scenario())


async def _collect(stream):
    last = None
    async for output in stream:
        last = output
    return last


def test_prompts_arriving_together_compute_a_shared_prefix_once(tiny_model):
    llm = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02, enable_prefix_caching=True)
    shared = "A long shared instruction that every request in this batch starts with, word for word. "
    prompts = [shared + f"Question {i}?" for i in range(4)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    together = llm.generate(prompts, params, use_tqdm=False)
    shared_blocks = len(llm.tokenizer.encode(shared)) // 4 - 1
    assert llm.engine.blocks.prefix_hits >= 3 * shared_blocks * 4  # three of four reused the first one's blocks
    alone = [
        LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02, enable_prefix_caching=False).generate([p], params, use_tqdm=False)[0]
        for p in prompts[:1]
    ]
    assert together[0].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_async_engine_rejects_bad_requests_and_keeps_serving(tiny_model):
    engine = AsyncLLMEngine(
        LLMConfig(model=ModelConfig(source=str(tiny_model)), engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.02))
    )

    async def scenario():
        # long enough to be still running when the second arrives: the tiny model makes 40 tokens in under 50 ms
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        running = asyncio.create_task(_collect(engine.generate("first", params, request_id="same-id")))
        await asyncio.sleep(0.05)
        with pytest.raises(InvalidRequestError, match="already in use"):
            await _collect(engine.generate("second", params, request_id="same-id"))
        with pytest.raises(ContextLengthError):
            await _collect(engine.generate("x " * 600, params))
        first = await running
        assert first.finished and len(first.outputs[0].token_ids) == 400

    asyncio.run(scenario())


STEP_THREADS_SCRIPT = """
import asyncio, ctypes, sys
from pathlib import Path
import torch
from serving.config import LLMConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams

omp = ctypes.CDLL(str(next((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))))
config = LLMConfig.model_validate({"model": {"source": sys.argv[1]}, "engine": {"num_threads": 2, "kv_cache_memory_gb": 0.02}})
engine = AsyncLLMEngine(config)
seen = []
step = engine.engine.step


def counting_step():
    seen.append(omp.omp_get_max_threads())
    return step()


engine.engine.step = counting_step

async def main():
    async for _ in engine.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True)):
        pass

asyncio.run(main())
print(sorted(set(seen)))
"""


def test_async_steps_use_the_configured_threads_under_omp_num_threads_1(tiny_model):
    """Ray sets OMP_NUM_THREADS=1 in a replica that reserves no CPUs, and OpenMP counts threads per OS
    thread: the step thread must run with the engine's num_threads, not one (a served engine at half speed)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", STEP_THREADS_SCRIPT, str(tiny_model)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[2]"


def test_async_engine_builds_and_steps_on_one_thread(tiny_model, monkeypatch):
    """Each OS thread that runs torch's parallel ops gets its own OpenMP team; two teams on two cores make
    libgomp sleep between ops instead of spinning (steps 10-30% slower). The model is built, stepped over
    several busy periods and driven offline all on the same thread, which is not the caller's."""
    built_on = []
    build = ModelRunner.__init__

    def recording_build(self, *args, **kwargs):
        built_on.append(threading.get_ident())
        build(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "__init__", recording_build)
    engine = AsyncLLMEngine(
        LLMConfig(model=ModelConfig(source=str(tiny_model)), engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.02))
    )
    stepped_on = set()
    step = engine.engine.step

    def recording_step():
        stepped_on.add(threading.get_ident())
        return step()

    engine.engine.step = recording_step
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for _ in range(3):  # the engine goes idle between these
        assert asyncio.run(_collect(engine.generate("again", params))).finished
    offline_on = engine.run_on_engine_thread(lambda sync: threading.get_ident())
    assert len(built_on) == 1 and stepped_on == {built_on[0]} == {offline_on}
    assert built_on[0] != threading.get_ident()


def test_async_engine_raises_a_build_error_in_the_callers_thread(tmp_path):
    """The model is built on the engine's thread; what goes wrong there reaches the caller with its type."""
    with pytest.raises(ModelSourceError):
        AsyncLLMEngine(LLMConfig(model=ModelConfig(source=str(tmp_path / "does-not-exist"))))


def test_n_siblings_fork_when_no_kv_block_is_free_for_the_partial_prompt_block(tiny_model):
    """32 blocks of 4 and a 125-token prompt: the parent fills every block, so its sibling has no block to copy the
    partial last one into. It recomputes that tail itself instead of stopping the engine."""
    block_bytes = 2 * 3 * 2 * 16 * 4 * 4  # K and V, 3 layers, 2 KV heads of 16, float32, 4 tokens
    llm = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=32 * block_bytes / 2**30, max_model_len=128)
    prompt = list(range(3, 128))  # 125 tokens
    params = SamplingParams(n=2, max_tokens=2, temperature=0, ignore_eos=True)
    [output] = llm.generate([prompt], params, use_tqdm=False)
    [single] = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [choice.token_ids for choice in output.outputs] == [single.outputs[0].token_ids] * 2
