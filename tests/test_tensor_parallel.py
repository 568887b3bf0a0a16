"""Tensor parallelism over gloo: every rank's logprobs and greedy tokens equal the single-worker engine's."""
from __future__ import annotations

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port
from reference import max_summary_difference, output_summary

from serving.config import EngineConfig, LLMConfig, ModelConfig
from serving.engine.llm import LLM
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.parallel.tensor import InvalidLayoutError, TensorParallel

PROMPTS = ["The capital of France is", "1, 2, 3,", "Tokyo 東京 🎌 and", "def f(x):"]
PARAMS = dict(max_tokens=8, temperature=0, logprobs=5, prompt_logprobs=5, ignore_eos=True)


def _rank(rank: int, size: int, port: int, config: LLMConfig, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        engine = LLMEngine(config, tp=TensorParallel(size, rank, dist.group.WORLD))
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, SamplingParams(**PARAMS))
        outputs = {}
        while engine.has_unfinished_requests():
            outputs |= {o.request_id: o for o in engine.step() if o.finished}
        results.put((rank, [output_summary(o) for _, o in sorted(outputs.items())]))
    finally:
        dist.destroy_process_group()


def run_tensor_parallel(config: LLMConfig, size: int) -> dict[int, list]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, size, port, config, results)) for r in range(size)]
    for p in procs:
        p.start()
    gathered = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return gathered




def check_against_single(config: LLMConfig, size: int) -> None:
    single = LLM(config=config).generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    reference = [output_summary(o) for o in single]
    for rank, outputs in run_tensor_parallel(config, size).items():
        assert [o[0] for o in outputs] == [r[0] for r in reference], f"rank {rank}"
        assert max_summary_difference(outputs, reference) < 1e-4


@pytest.mark.parametrize("size", [2, 4], ids=["tp2", "tp4-replicated-kv"])
def test_tiny_model_tensor_parallel_matches_single(tiny_model, size):
    config = LLMConfig(model=ModelConfig(source=str(tiny_model)), engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.01, max_num_batched_tokens=16))
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
        LLMEngine(LLMConfig(model=ModelConfig(source=str(default_model))), tp=TensorParallel(2, 0, None))
