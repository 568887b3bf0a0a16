"""Tensor parallelism over gloo: each rank's ModelRunner, given the same steps, returns the single
runner's logits (prompt logits and the logits of greedy decoding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

from serving.config import EngineConfig, LLMConfig, ModelConfig
from serving.engine.model_runner import ModelRunner
from serving.engine.runner import SeqChunk, StepInput
from serving.models.sharding import SINGLE, InvalidLayoutError, TensorParallel
from serving.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "1, 2, 3,", "Tokyo 東京 🎌 and", "def f(x):"]
NEW_TOKENS = 8
MAX_MODEL_LEN = 64


def greedy_logits(config: LLMConfig, tp: TensorParallel) -> list[torch.Tensor]:
    """Log-probabilities of every step of greedy decoding of PROMPTS, driven by hand: the prompts as one
    prefill step (all positions' logits), then NEW_TOKENS - 1 decode steps."""
    folder = Path(config.model.source)
    runner = ModelRunner(folder, config, MAX_MODEL_LEN, tp)
    tokenizer = Tokenizer.from_folder(folder)
    per_seq = MAX_MODEL_LEN // config.engine.block_size
    seqs = [tokenizer.encode(p) for p in PROMPTS]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(seqs))]
    chunks = [SeqChunk(ids, 0, table, sample=True, prompt_logits=True) for ids, table in zip(seqs, tables)]
    logits = runner.execute(StepInput(chunks, []))
    steps = [torch.log_softmax(rows, dim=-1) for rows in logits.prompt_logits.values()]
    for _ in range(NEW_TOKENS - 1):
        for ids, token in zip(seqs, logits.sample_logits.argmax(dim=-1).tolist()):
            ids.append(token)
        chunks = [SeqChunk(ids[-1:], len(ids) - 1, table, sample=True, prompt_logits=False) for ids, table in zip(seqs, tables)]
        logits = runner.execute(StepInput(chunks, []))
        steps.append(torch.log_softmax(logits.sample_logits.float(), dim=-1))
    return steps


def _rank(rank: int, size: int, port: int, config: LLMConfig, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        steps = greedy_logits(config, TensorParallel(size, rank, dist.group.WORLD))
        results.put((rank, [step.numpy() for step in steps]))  # by value: a tensor would be shared memory the rank frees on exit
    finally:
        dist.destroy_process_group()


def run_tensor_parallel(config: LLMConfig, size: int) -> dict[int, list[torch.Tensor]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, size, port, config, results)) for r in range(size)]
    for p in procs:
        p.start()
    gathered = {rank: [torch.from_numpy(step) for step in steps] for rank, steps in (results.get(timeout=600) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return gathered


def check_against_single(config: LLMConfig, size: int) -> None:
    reference = greedy_logits(config, SINGLE)
    for rank, steps in run_tensor_parallel(config, size).items():
        assert len(steps) == len(reference)
        for got, want in zip(steps, reference):
            assert torch.equal(got.argmax(dim=-1), want.argmax(dim=-1)), f"rank {rank}"
            top = want.topk(5, dim=-1).indices  # the logprobs an API response would carry
            assert (got.gather(-1, top) - want.gather(-1, top)).abs().max().item() < 1e-4, f"rank {rank}"


@pytest.mark.parametrize("size", [2, 4], ids=["tp2", "tp4-replicated-kv"])
def test_tiny_model_tensor_parallel_matches_single(tiny_model, size):
    config = LLMConfig(
        model=ModelConfig(source=str(tiny_model)), engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.01, max_num_batched_tokens=16)
    )
    check_against_single(config, size)


@pytest.mark.parametrize("quantization, size", [("int8", 4), ("int4", 2)], ids=["int8-tp4", "int4-tp2"])
def test_quantized_tiny_model_tensor_parallel_matches_single(tiny_model, quantization, size):
    """Each rank's slices carry their rows' scales, so the ranks' partial sums add up to the single worker's."""
    config = LLMConfig(
        model=ModelConfig(source=str(tiny_model), quantization=quantization),
        engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.01, max_num_batched_tokens=16),
    )
    check_against_single(config, size)


@pytest.mark.slow
def test_default_model_tp3_matches_single(default_model):
    config = LLMConfig(model=ModelConfig(source=str(default_model), max_model_len=256), engine=EngineConfig(kv_cache_memory_gb=0.1))
    check_against_single(config, 3)


def test_layout_that_does_not_divide_the_heads_is_refused(default_model):
    with pytest.raises(InvalidLayoutError, match="9 attention heads"):
        ModelRunner(Path(default_model), LLMConfig(model=ModelConfig(source=str(default_model))), 256, TensorParallel(2, 0, None))
