"""Quantized models (int8, int4, GGUF in its own precision) against the float32 engine over the
same dequantized weights, and the errors for formats that cannot be served."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_files import write_gguf
from reference import int8_inputs, max_summary_difference, output_summary
from safetensors.torch import load_file, save_file
from torch import nn

from serving.config import LLMConfig
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.errors import ModelSourceError
from serving.models import cpu_kernels
from serving.models.gguf_convert import convert_gguf_to_hf
from serving.models.quant import QuantizationError, quantize
from serving.models.tiny import make_tiny_llama

pytestmark = pytest.mark.skipif(
    cpu_kernels.unavailable_reason() is not None, reason=f"CPU kernels cannot run here: {cpu_kernels.unavailable_reason()}"
)

PROMPTS = ["The capital of France is", "1, 2, 3,", "Tokyo 東京 🎌 and", "def f(x):", "Hello, world! How are you today? I am"]
PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=5, prompt_logprobs=5, ignore_eos=True)
# small steps split prompts into chunks; prefix caching reuses blocks on the second pass
ENGINE = {"block_size": 4, "kv_cache_memory_gb": 0.01, "max_num_batched_tokens": 16, "enable_prefix_caching": True}


class Int8Inputs(nn.Module):
    """A float layer that first rounds its input as int8_inputs does."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.linear(int8_inputs(x), *args)


def with_int8_inputs(llm: LLM) -> LLM:
    """The float engine made the reference of int4's arithmetic: each decoder layer's projections take
    int8-rounded inputs (the layer by layer path: the fused decode call would bypass them)."""
    model = llm.engine.runner.model
    for layer in model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.qkv_proj, attention.o_proj = Int8Inputs(attention.qkv_proj), Int8Inputs(attention.o_proj)
        mlp.gate_up_proj, mlp.down_proj = Int8Inputs(mlp.gate_up_proj), Int8Inputs(mlp.down_proj)
    model.fused_decode = None
    return llm


def summaries(folder: Path, repeat: int = 2, reference_of_int4: bool = False, **options) -> list:
    llm = LLM(str(folder), **ENGINE, **options)
    if reference_of_int4:
        with_int8_inputs(llm)
    runs = [[output_summary(o) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] for _ in range(repeat)]
    assert runs[0] == runs[-1], "the prefix-cached second pass gives the same outputs"
    return runs[0]


def dequantized_copy(folder: Path, kind: str, out: Path) -> Path:
    """`folder` with every matrix replaced by its quantized, then dequantized, float32 values: the
    layers' in `kind`, the embedding's and LM head's in int8."""
    shutil.copytree(folder, out)
    weights = load_file(folder / "model.safetensors")
    for name, w in weights.items():
        if w.dim() == 2:
            weights[name] = quantize(w, "q8" if "embed_tokens" in name or "lm_head" in name else kind).dequantize()
    save_file(weights, str(out / "model.safetensors"))
    return out


def assert_same(outputs: list, reference: list) -> None:
    assert [o[0] for o in outputs] == [r[0] for r in reference]
    assert max_summary_difference(outputs, reference) < 1e-4


@pytest.mark.parametrize("quantization, kind", [("int8", "q8"), ("int4", "q4")])
@pytest.mark.parametrize("model", ["llama-tied", "llama-own-head", "qwen2-bias"])
def test_quantized_model_is_the_float_model_of_its_dequantized_weights(tmp_path, quantization, kind, model):
    """int8: the float model of the dequantized weights; int4: the same with its layers' inputs rounded to int8."""
    options = {"llama-tied": {}, "llama-own-head": {"tie_word_embeddings": False}, "qwen2-bias": {"architecture": "Qwen2ForCausalLM"}}
    folder = make_tiny_llama(tmp_path / "tiny", **options[model])
    dequantized = dequantized_copy(folder, kind, tmp_path / "dequantized")
    reference = summaries(dequantized, repeat=1, reference_of_int4=quantization == "int4")
    assert_same(summaries(folder, quantization=quantization), reference)


def test_int4_rounds_its_layers_inputs_to_int8(tmp_path):
    """Not float inputs by accident: without the rounding the reference differs from int4's outputs."""
    folder = make_tiny_llama(tmp_path / "tiny")
    dequantized = dequantized_copy(folder, "q4", tmp_path / "dequantized")
    assert max_summary_difference(summaries(folder, repeat=1, quantization="int4"), summaries(dequantized, repeat=1)) > 1e-3


def test_quantized_weights_are_the_loaded_model(tmp_path):
    """Not the float weights by accident: int4 changes the outputs of the tiny model."""
    folder = make_tiny_llama(tmp_path / "tiny")
    assert max_summary_difference(summaries(folder, repeat=1, quantization="int4"), summaries(folder, repeat=1)) > 1e-3


def _mixed_types(name: str) -> T:
    """Every native type, plus one (Q5_0) that has no kernel and is dequantized at load."""
    if "token_embd" in name or "attn_output" in name:
        return T.Q8_0
    if "ffn_down" in name:
        return T.Q4_0
    if "blk.1.attn_v" in name:
        return T.Q5_0
    return T.Q4_1


def test_gguf_served_in_its_own_precision_is_the_float_model_converted_from_it(tmp_path, caplog):
    gguf_path = write_gguf(make_tiny_llama(tmp_path / "tiny"), tmp_path / "tiny.gguf", _mixed_types)
    folder = convert_gguf_to_hf(gguf_path, tmp_path / "converted", keep_gguf=True)
    reference = summaries(folder, repeat=1)
    with caplog.at_level(logging.WARNING, logger="serving.models.gguf_weights"):
        outputs = summaries(folder, quantization="gguf")
    assert_same(outputs, reference)
    assert "blk.1.attn_v.weight is Q5_0, which has no kernel here; dequantized to float32" in caplog.text
    assert "blk.1.attn_q.weight is Q4_1, dequantized to float32 with the tensors of other types it is fused with" in caplog.text
    assert "blk.0." not in caplog.text and "Q8_0" not in caplog.text


@pytest.mark.slow
def test_default_models_q4_1_file_gives_the_logits_of_its_float32_conversion(default_model):
    options = {"max_model_len": 256, "kv_cache_memory_gb": 0.05}
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    prompts = PROMPTS[:3]
    reference = [output_summary(o) for o in LLM(str(default_model), **options).generate(prompts, params, use_tqdm=False)]
    outputs = [output_summary(o) for o in LLM(str(default_model), quantization="gguf", **options).generate(prompts, params, use_tqdm=False)]
    assert_same(outputs, reference)


# --- what cannot be served -------------------------------------------------------------------------


def test_fp8_on_a_cpu_is_refused_by_name(tiny_model):
    with pytest.raises(QuantizationError, match="quantization 'fp8' needs a CUDA GPU"):
        LLM(str(tiny_model), quantization="fp8", device="cpu")


def test_int4_without_the_avx2_kernels_is_refused_with_the_reason(tiny_model, monkeypatch):
    monkeypatch.setenv("LLM_CLUSTER_CPU_KERNELS", "0")  # as on a CPU without AVX2: the kernels are unavailable
    cpu_kernels.load_cpu_kernels.cache_clear()
    try:
        with pytest.raises(QuantizationError, match="quantization 'int4' needs this project's CPU kernels.*LLM_CLUSTER_CPU_KERNELS=0"):
            LLM(str(tiny_model), quantization="int4")
    finally:
        monkeypatch.undo()
        cpu_kernels.load_cpu_kernels.cache_clear()


def test_int4_needs_inputs_in_groups_of_32(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny", hidden_size=48, num_heads=3, num_kv_heads=1)
    with pytest.raises(QuantizationError, match="quantization 'int4' cannot hold layers.0.self_attn.qkv_proj: .*groups of 32.*48 inputs"):
        LLM(str(folder), quantization="int4", **ENGINE)


def test_a_gguf_type_without_kernel_or_dequantizer_is_named(tmp_path):
    types = lambda name: T.Q8_1 if name == "blk.0.ffn_up.weight" else T.F32
    gguf_path = write_gguf(make_tiny_llama(tmp_path / "tiny"), tmp_path / "tiny.gguf", types)
    folder = make_tiny_llama(tmp_path / "folder")
    shutil.copy(gguf_path, folder)
    with pytest.raises(ModelSourceError, match="tensor blk.0.ffn_up.weight is Q8_1, which has no kernel here and cannot be dequantized"):
        LLM(str(folder), quantization="gguf", **ENGINE)


def test_gguf_quantization_needs_a_gguf_file(tiny_model):
    with pytest.raises(ModelSourceError, match="holds 0 .gguf files"):
        LLM(str(tiny_model), quantization="gguf", **ENGINE)


def _int8_checkpoint(folder: Path, with_scales: bool) -> Path:
    """`folder` as a pre-quantized per-channel int8 checkpoint (compressed-tensors' W8A16 naming)."""
    weights = load_file(folder / "model.safetensors")
    quantized = {}
    for name, w in weights.items():
        if w.dim() == 2:
            rows = quantize(w, "q8")
            quantized[name] = rows.data
            if with_scales:
                quantized[f"{name}_scale"] = rows.scales
        else:
            quantized[name] = w
    save_file(quantized, str(folder / "model.safetensors"))
    return folder


def test_a_pre_quantized_int8_checkpoint_is_served_as_is(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny")
    reference = summaries(folder, repeat=1, quantization="int8")
    assert_same(summaries(_int8_checkpoint(folder, with_scales=True), repeat=1, quantization="int8"), reference)
    with pytest.raises(ModelSourceError, match="stored as I8, a quantized checkpoint: serve it with quantization 'int8'"):
        LLM(str(folder), **ENGINE)


def test_an_int8_checkpoint_whose_scales_are_missing_is_named(tmp_path):
    folder = _int8_checkpoint(make_tiny_llama(tmp_path / "tiny"), with_scales=False)
    with pytest.raises(ModelSourceError, match=r"tensor model\.\S+\.weight is int8 but its scale model\.\S+\.weight_scale is missing"):
        LLM(str(folder), quantization="int8", **ENGINE)


def test_config_offers_the_formats():
    assert LLMConfig.model_validate({"model": {"quantization": "int4"}}).model.quantization == "int4"
    with pytest.raises(ValueError):
        LLMConfig.model_validate({"model": {"quantization": "int3"}})
    with pytest.raises(ValueError, match="quantization 'int8' runs on the native backend only"):
        LLMConfig.model_validate({"model": {"quantization": "int8"}, "parallel": {"backend": "deepspeed"}})


def test_a_tied_quantized_embedding_and_lm_head_hold_one_copy(tiny_model):
    model = LLM(str(tiny_model), quantization="int4", **ENGINE).engine.runner.model
    assert model.embed_tokens.head is model.lm_head and model.embed_tokens.data is None
    assert model.lm_head.kind == "q8" and model.layers[0].mlp.gate_up_proj.kind == "q4"
