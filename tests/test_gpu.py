"""CUDA checks: float32 logprobs against transformers, bf16 CUDA graphs against eager, fp8 weights against
bf16 (on GPUs with FP8 matrix units; the fp8 refusal on older ones). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from reference import load_reference, max_logprob_error, reference_greedy, reference_logprobs

from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.models.quant import QuantizationError
from serving.models.tiny import make_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FP8_UNITS = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "def f(x):", "東京 🎌", "A", "Hello world", "Paged"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("gpu") / "tiny", num_layers=3, hidden_size=128, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_float32_matches_transformers_on_cuda(model_dir, enforce_eager):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    llm = LLM(str(model_dir), device="cuda", dtype="float32", kv_cache_memory_gb=0.1, max_num_seqs=8, enforce_eager=enforce_eager)
    ref = load_reference(model_dir, torch.float32, "cuda")
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    for batch in (1, 8):
        for output in llm.generate(PROMPTS[:batch], params, use_tqdm=False):
            completion = output.outputs[0]
            assert completion.token_ids == reference_greedy(ref, output.prompt_token_ids, 12)
            reference = reference_logprobs(ref, output.prompt_token_ids + completion.token_ids)
            assert max_logprob_error(output, reference) < 1e-4


def test_bfloat16_cuda_graphs_match_eager(model_dir):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    runs = []
    for eager in (True, False):
        llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", kv_cache_memory_gb=0.1, max_num_seqs=8, enforce_eager=eager)
        assert bool(llm.engine.runner.graphs) is not eager
        runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)])
    assert runs[0] == runs[1]


@pytest.mark.skipif(not FP8_UNITS, reason="needs a GPU with FP8 matrix units (compute capability 8.9+)")
def test_fp8_greedy_tokens_mostly_agree_with_bf16(model_dir):
    """fp8 against bf16 with CUDA graphs on. e4m3 rounding moves the random tiny model's logits by 10-20%
    (tests/test_fp8.py), so near ties flip: judged on the first token of each prompt and position by
    position on bf16's own continuation (prompt logprobs: rank 1 is fp8's argmax). Then fp8's CUDA
    graphs give the tokens of eager fp8."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    bf16 = LLM(str(model_dir), device="cuda", dtype="bfloat16", kv_cache_memory_gb=0.1, max_num_seqs=8)
    reference = [(o.prompt_token_ids, o.outputs[0].token_ids) for o in bf16.generate(PROMPTS, params, use_tqdm=False)]
    del bf16
    fp8 = LLM(str(model_dir), device="cuda", dtype="bfloat16", quantization="fp8", kv_cache_memory_gb=0.1, max_num_seqs=8)
    assert fp8.engine.runner.graphs
    graphs = [o.outputs[0].token_ids for o in fp8.generate(PROMPTS, params, use_tqdm=False)]
    assert sum(tokens[0] == generated[0] for tokens, (_, generated) in zip(graphs, reference)) >= 5  # 6 of 8 on CPU
    forced = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, ignore_eos=True)
    continuations = [prompt + generated for prompt, generated in reference]
    ranks = [  # entry j (logprob, top-k, rank) predicts token j; rank 1: fp8's own argmax is bf16's token
        entry[2]
        for (prompt, _), output in zip(reference, fp8.generate(continuations, forced, use_tqdm=False))
        for entry in output.prompt_logprobs[len(prompt) :]
    ]
    assert sum(rank == 1 for rank in ranks) >= 0.65 * len(ranks)  # 80% on CPU
    del fp8
    eager = LLM(
        str(model_dir), device="cuda", dtype="bfloat16", quantization="fp8", kv_cache_memory_gb=0.1, max_num_seqs=8, enforce_eager=True
    )
    assert [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params, use_tqdm=False)] == graphs


@pytest.mark.skipif(FP8_UNITS, reason="this GPU has FP8 matrix units")
def test_fp8_is_refused_on_a_gpu_without_fp8_units(model_dir):
    major, minor = torch.cuda.get_device_capability()
    with pytest.raises(QuantizationError, match=f"has compute capability {major}.{minor}"):
        LLM(str(model_dir), device="cuda", dtype="bfloat16", quantization="fp8", kv_cache_memory_gb=0.1)
