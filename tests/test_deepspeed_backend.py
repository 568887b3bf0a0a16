"""The deepspeed backend: Hugging Face models split by DeepSpeed AutoTP over the replica's Ray workers.

Checked on the default model against the native single-worker engine, and on an architecture the
native engine does not implement (Qwen3, randomly initialised) against transformers itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from reference import load_reference, max_logprob_error, max_summary_difference, output_summary, reference_greedy, reference_logprobs

from serving.config import EngineConfig, LLMConfig, ModelConfig, ParallelConfig
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.errors import UnsupportedModelError

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "1, 2, 3,", "Tokyo 東京 🎌 and", "def f(x):"]
PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=5, prompt_logprobs=3, ignore_eos=True)


def _config(folder: Path, backend: str, tp: int, **engine) -> LLMConfig:
    return LLMConfig(
        model=ModelConfig(source=str(folder), max_model_len=128),
        engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.05, **engine),
        parallel=ParallelConfig(tensor_parallel=tp, backend=backend, placement_timeout_s=30),
    )


def _generate(config: LLMConfig, prompts: list, params: SamplingParams = PARAMS) -> list:
    llm = LLM(config=config)
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        if config.parallel.world_size > 1:
            llm.engine.runner.shutdown()


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory, tiny_model) -> Path:
    """A tiny random Qwen3 (q/k norms: not a native architecture) with the tiny Llama's tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("models") / "tiny-qwen3"
    config = Qwen3Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    for parameter in model.parameters():  # wide weights, so greedy outputs depend on the prompt
        torch.nn.init.normal_(parameter, std=0.1)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, folder / name)
    return folder


def test_default_model_at_tp3_matches_the_native_single_worker_engine(cluster, default_model):
    native = [output_summary(o) for o in _generate(_config(default_model, "native", 1), PROMPTS)]
    deepspeed_tp1 = [output_summary(o) for o in _generate(_config(default_model, "deepspeed", 1), PROMPTS)]
    deepspeed_tp3 = [output_summary(o) for o in _generate(_config(default_model, "deepspeed", 3, max_num_batched_tokens=16), PROMPTS)]
    assert [o[0] for o in deepspeed_tp3] == [o[0] for o in native] == [o[0] for o in deepspeed_tp1]
    assert max_summary_difference(deepspeed_tp3, deepspeed_tp1) < 1e-4
    assert max_summary_difference(deepspeed_tp3, native) < 1e-4


def test_an_architecture_the_native_engine_lacks_runs_split_over_workers(cluster, qwen3_model):
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM"):
        LLM(config=_config(qwen3_model, "native", 1))
    outputs = _generate(_config(qwen3_model, "deepspeed", 2, max_num_batched_tokens=16), PROMPTS)
    reference = load_reference(qwen3_model)
    for output in outputs:
        assert output.outputs[0].token_ids == reference_greedy(reference, output.prompt_token_ids, PARAMS.max_tokens)
        all_ids = output.prompt_token_ids + output.outputs[0].token_ids
        assert max_logprob_error(output, reference_logprobs(reference, all_ids)) < 1e-4


def test_deepspeed_backend_refuses_pipeline_stages():
    with pytest.raises(ValueError, match="tensor parallelism only"):
        ParallelConfig(backend="deepspeed", pipeline_parallel=2)
