"""The engine's logprobs and greedy tokens against Hugging Face transformers (float32, CPU).

Logprobs are the log-softmax of the logits, so matching them position by position (prompt
positions through prompt_logprobs, generated positions through logprobs, chosen token and top-5)
checks the logits up to the softmax normaliser, on both the prefill and the paged decode path.
"""

from __future__ import annotations

import pytest
from reference import load_reference, max_logprob_error, output_summary, reference_greedy, reference_logprobs

from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.models.tiny import make_tiny_llama

TOLERANCE = 1e-4
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Tokyo 東京 is a city with emoji 🎌 and",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "A",
    "Paged attention splits the key-value cache into fixed-size blocks so that",
]
# engine layouts: plain; tiny step budget so prompts are split into chunks; prefix caching with
# a second pass that reuses the first pass's blocks
LAYOUTS = {
    "plain": dict(enable_chunked_prefill=False, enable_prefix_caching=False),
    "chunked": dict(max_num_batched_tokens=16, enable_prefix_caching=False),
    "prefix-cached": dict(enable_prefix_caching=True),
}


def check_against_reference(llm: LLM, ref, prompts: list[str], max_tokens: int, repeat: int = 1) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    for _ in range(repeat):
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for output in outputs:
            completion = output.outputs[0]
            assert completion.token_ids == reference_greedy(ref, output.prompt_token_ids, max_tokens)
            reference = reference_logprobs(ref, output.prompt_token_ids + completion.token_ids)
            assert max_logprob_error(output, reference) < TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 8])
def test_tiny_model_matches_transformers(tiny_model, layout, batch):
    llm = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02, **LAYOUTS[layout])
    check_against_reference(llm, load_reference(tiny_model), PROMPTS[:batch], max_tokens=10, repeat=2)


def test_prefix_cache_is_used_and_exact(tiny_model):
    llm = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02, enable_prefix_caching=True)
    shared = "This is a long shared system prompt that several requests start with. " * 3
    prompts = [shared + "First question?", shared + "Second question?"]
    ref = load_reference(tiny_model)
    check_against_reference(llm, ref, prompts[:1], max_tokens=6)
    hits_before = llm.engine.blocks.prefix_hits
    # prompt logprobs disable cache hits, so check the second prompt with output logprobs only
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=5, ignore_eos=True)
    output = llm.generate(prompts[1:], params, use_tqdm=False)[0]
    assert llm.engine.blocks.prefix_hits - hits_before >= 16
    reference = reference_logprobs(ref, output.prompt_token_ids + output.outputs[0].token_ids)
    assert max_logprob_error(output, reference) < TOLERANCE


def test_unpacked_layers_match_transformers(tiny_model, monkeypatch):
    """The plain nn.Linear layers (GPUs, lower precisions, CPUs without our kernels) against the reference too:
    on CPU float32 the engine otherwise runs the panel-packed ones."""
    from serving.engine import model_runner

    monkeypatch.setattr(model_runner, "load_cpu_kernels", lambda: None)
    llm = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02, max_num_batched_tokens=16)
    assert not any(name.endswith("panels") for name, _ in llm.engine.runner.model.named_buffers())
    check_against_reference(llm, load_reference(tiny_model), PROMPTS[:4], max_tokens=8)


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_fused_decode_steps_are_the_layer_by_layer_steps(tiny_model, quantization):
    """A decode-only step goes through all the layers in one kernel call (cpu_layers.FusedDecode): the
    same outputs, bit for bit, as the layers' own kernel calls, at batch 1 and with several sequences."""
    llm = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02, enable_prefix_caching=False, quantization=quantization)
    model = llm.engine.runner.model
    assert model.fused_decode is not None
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=5, ignore_eos=True)

    def summaries(prompts: list[str]) -> list:
        return [output_summary(o) for o in llm.generate(prompts, params, use_tqdm=False)]

    fused = [summaries(PROMPTS[:1]), summaries(PROMPTS)]
    model.fused_decode = None
    assert [summaries(PROMPTS[:1]), summaries(PROMPTS)] == fused


@pytest.mark.parametrize(
    "architecture, options",
    [
        ("MistralForCausalLM", {}),
        ("Qwen2ForCausalLM", {}),
        ("LlamaForCausalLM", {"tie_word_embeddings": False, "num_kv_heads": 1}),
        (
            "LlamaForCausalLM",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
    ],
    ids=["mistral", "qwen2-bias", "untied-mqa", "llama3-rope"],
)
def test_architectures_match_transformers(tmp_path, architecture, options):
    folder = make_tiny_llama(tmp_path / "model", architecture=architecture, **options)
    llm = LLM(str(folder), block_size=4, kv_cache_memory_gb=0.02, max_num_batched_tokens=16)
    check_against_reference(llm, load_reference(folder), PROMPTS[:4], max_tokens=8)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["plain", "chunked", "prefix-cached"])
def test_default_model_matches_transformers(default_model, layout):
    llm = LLM(str(default_model), max_model_len=512, kv_cache_memory_gb=0.25, **LAYOUTS[layout])
    ref = load_reference(default_model)
    check_against_reference(llm, ref, PROMPTS[:1], max_tokens=8)
    check_against_reference(llm, ref, PROMPTS[:8], max_tokens=8, repeat=2 if layout == "prefix-cached" else 1)


@pytest.mark.slow
def test_default_model_answers(default_model):
    llm = LLM(str(default_model), max_model_len=512, kv_cache_memory_gb=0.25)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    output = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"


def test_sharded_checkpoint_loads_the_same_model(tmp_path, tiny_model):
    """A checkpoint split over two files with model.safetensors.index.json gives identical outputs."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for filename, part in halves.items():
        save_file({name: tensors[name] for name in part}, sharded / filename)
        weight_map |= {name: filename for name in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    whole = LLM(str(tiny_model), kv_cache_memory_gb=0.02).generate(PROMPTS[:3], params, use_tqdm=False)
    split = LLM(str(sharded), kv_cache_memory_gb=0.02).generate(PROMPTS[:3], params, use_tqdm=False)
    assert [o.outputs[0].logprobs for o in whole] == [o.outputs[0].logprobs for o in split]
