"""CUDA checks: float32 logprobs against transformers, bf16 CUDA graphs against eager. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from reference import load_reference, max_logprob_error, reference_greedy, reference_logprobs

from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.models.tiny import make_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

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
