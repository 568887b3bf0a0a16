"""FP8 weights (serving/models/fp8.py) on CPU: torch._scaled_mm runs there too, so the layer's numerics,
the quantizer, tensor-parallel slices, the loader and pre-quantized checkpoints are checked without a
GPU; the engine itself refuses fp8 on a CPU. End-to-end CUDA checks are in tests/test_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from serving.engine.llm import LLM
from serving.errors import ModelSourceError
from serving.models.arch import ModelArch
from serving.models.attention import AttentionMetadata, PrefillChunk
from serving.models.fp8 import FP8, FP8_MAX, Fp8Linear, Fp8Rows, quantize_activations, quantize_fp8
from serving.models.llama import LlamaForCausalLM
from serving.models.loader import load_model
from serving.models.quant import QuantizationError
from serving.models.sharding import TensorParallel
from serving.models.tiny import make_tiny_llama

# e4m3 keeps 3 mantissa bits: rounding a normal value errs by at most half a step, 2^-4 of its size;
# below the smallest normal (2^-6) steps are 2^-9 apart, so the error is at most 2^-10 (in units of the scale)
RELATIVE = 2**-4
SUBNORMAL = 2**-10
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def random_weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, as real checkpoints have, and one all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 1, rows)[:, None]
    w[rows // 2] = 0
    return w


def fp8_layer(w: torch.Tensor, gated: bool = False, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Fp8Linear:
    layer = Fp8Linear(w.shape[0], w.shape[1], bias is not None, gated, dtype)
    layer.load_rows(0, quantize_fp8(w))
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


def error_bound(x: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    """Worst-case |x W^T - x_fp8 W^T| per output when each activation is rounded to e4m3 with its token's scale."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    return RELATIVE * x.abs() @ deq.abs().t() + SUBNORMAL * scale * deq.abs().sum(dim=1)


def test_quantize_keeps_each_weight_within_e4m3_rounding_of_its_row_scale():
    w = random_weights(64, 96)
    rows = quantize_fp8(w)
    assert rows.data.dtype == FP8 and rows.data.shape == (64, 96)
    assert rows.scales.dtype == torch.float32 and rows.scales.shape == (64,)
    torch.testing.assert_close(rows.scales, w.abs().amax(dim=1) / FP8_MAX)  # one scale per output row
    error = (rows.dequantize() - w).abs()
    bound = torch.maximum(RELATIVE * w.abs(), SUBNORMAL * rows.scales[:, None]) * (1 + 1e-6)
    assert (error <= bound).all()
    assert error.max() > 0  # e4m3 does round: the check above is not comparing w with itself
    peaks = w.abs().argmax(dim=1)
    torch.testing.assert_close(rows.data.float().abs().gather(1, peaks[:, None]).flatten()[rows.scales > 0], torch.full((63,), FP8_MAX))


def test_an_all_zero_row_quantizes_to_zeros_with_scale_zero():
    rows = quantize_fp8(random_weights(32, 16))
    assert rows.scales[16] == 0
    assert (rows.data[16].float() == 0).all()
    assert torch.isfinite(rows.dequantize()).all()


def test_activations_are_scaled_per_token():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    x[1] *= 1000  # an outlier token
    x[2] = 0
    q, scales = quantize_activations(x)
    assert q.dtype == FP8 and scales.shape == (4, 1) and scales.dtype == torch.float32
    expected = x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    torch.testing.assert_close(scales[[0, 1, 3]], expected[[0, 1, 3]])
    assert (q[2].float() == 0).all()  # a zero token stays zero, not NaN
    deq = q.float() * scales
    for token in (0, 1, 3):  # each token is within e4m3 rounding of itself, whatever the others' size
        bound = torch.maximum(RELATIVE * x[token].float().abs(), SUBNORMAL * scales[token]) * (1 + 1e-6)
        assert ((deq[token] - x[token].float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_matches_float_product_of_its_dequantized_weights(dtype):
    w = random_weights(48, 64)
    layer = fp8_layer(w, dtype=dtype)
    x = torch.randn(2, 5, 64).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 5, 48)
    deq = layer.rows_().dequantize()
    reference = x.float() @ deq.t()
    # activation rounding (error_bound), then the output's own rounding to the model dtype
    output_rounding = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert ((out.float() - reference).abs() <= error_bound(x, deq) + output_rounding * reference.abs() + 1e-6).all()
    relative = (out.float() - reference).norm() / reference.norm()
    # typical error is far below the worst case: e4m3 rounding errs by 2.6% of a value in RMS
    # (half-step 2^-4, uniform, over mantissas 1..2), and the output's errors are about as large
    assert relative < 0.04
    unquantized = x.float() @ w.t()  # the weights' rounding too: about sqrt(2) times as much
    assert (out.float() - unquantized).norm() / unquantized.norm() < 0.06


def test_bias_gating_and_residual_apply_to_the_product():
    w = random_weights(64, 32, seed=1)
    bias = torch.randn(64).to(torch.bfloat16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    product = fp8_layer(w)(x)
    out = fp8_layer(w, bias=bias)(x)
    # the bias is added before the product is rounded to bf16: the two differ by two bf16 roundings,
    # half a step (at most 2^-8 of a value) each
    exact = product.float() + bias.float()
    assert ((out.float() - exact).abs() <= 2**-7 * (product.float().abs() + bias.float().abs())).all()
    gate, up = out.chunk(2, dim=-1)
    assert torch.equal(fp8_layer(w, gated=True, bias=bias)(x), torch.nn.functional.silu(gate) * up)
    residual = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(fp8_layer(w, bias=bias)(x, residual), out + residual)


def test_layer_refuses_shapes_the_fp8_units_cannot_take():
    with pytest.raises(QuantizationError, match="multiples of 16; this matrix is 40 x 64"):
        Fp8Linear(40, 64, False, False, torch.bfloat16)


def test_tensor_parallel_slices_carry_their_scales():
    w = random_weights(64, 96, seed=2)
    whole = quantize_fp8(w)
    x = torch.randn(3, 96, dtype=torch.float64)
    product = x @ whole.dequantize().double().t()
    # column-parallel: rows with their scales, the outputs concatenate
    columns = [whole.narrow(0, start, 32) for start in (0, 32)]
    torch.testing.assert_close(torch.cat([x @ part.dequantize().double().t() for part in columns], dim=1), product)
    # row-parallel: inputs cut, every row keeps its scale, the partial sums add up
    inputs = [(start, whole.narrow(1, start, 48)) for start in (0, 48)]
    assert all(part.scales is whole.scales for _, part in inputs)
    torch.testing.assert_close(sum(x[:, start : start + 48] @ part.dequantize().double().t() for start, part in inputs), product)
    # and the row-parallel layers' outputs, each quantizing its own slice of the activations, add up too
    xb = x.to(torch.bfloat16)
    partial = [fp8_layer(torch.zeros(64, 48)) for _ in inputs]
    for layer, (_, part) in zip(partial, inputs):
        layer.load_rows(0, part)
    total = sum(layer(xb[:, start : start + 48]).float() for layer, (start, _) in zip(partial, inputs))
    bound = sum(error_bound(xb[:, s : s + 48], p.dequantize()) for s, p in inputs) + 2**-7 * product.float().abs()
    assert ((total - product.float()).abs() <= bound + 1e-6).all()


def test_quantizing_on_load_holds_every_decoder_linear_in_fp8(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny", tie_word_embeddings=False)
    model = load(folder)
    weights = load_file(folder / "model.safetensors")
    layer = model.layers[1]
    assert isinstance(layer.mlp.down_proj, Fp8Linear) and layer.mlp.gate_up_proj.gated
    expected = quantize_fp8(weights["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
    assert torch.equal(layer.mlp.down_proj.weight.view(torch.uint8), expected.data.view(torch.uint8))
    assert torch.equal(layer.mlp.down_proj.weight_scale, expected.scales)
    q, k, v = (weights[f"model.layers.1.self_attn.{p}_proj.weight"].to(torch.bfloat16) for p in "qkv")
    assert torch.equal(layer.self_attn.qkv_proj.weight_scale, quantize_fp8(torch.cat((q, k, v))).scales)
    # the embedding and LM head stay in the model dtype
    assert type(model.embed_tokens) is nn.Embedding and model.embed_tokens.weight.dtype == torch.bfloat16
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16


def test_tensor_parallel_ranks_load_slices_of_the_single_worker_weights(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny")
    whole = load(folder)
    ranks = [load(folder, TensorParallel(2, rank)) for rank in range(2)]
    for name in LINEARS:
        full = whole.layers[0].get_submodule(name).rows_()
        parts = [model.layers[0].get_submodule(name).rows_() for model in ranks]
        if name.endswith(("o_proj", "down_proj")):  # row-parallel: inputs split, every scale whole
            assert all(torch.equal(p.scales, full.scales) for p in parts)
            assert torch.equal(torch.cat([p.data.view(torch.uint8) for p in parts], dim=1), full.data.view(torch.uint8))
        else:  # column-parallel: each rank's rows (q/k/v and gate/up heads interleave by rank), with their scales
            for part in parts:
                rows = [int((full.data.view(torch.uint8) == row).all(dim=1).nonzero()[0]) for row in part.data.view(torch.uint8)]
                assert torch.equal(part.scales, full.scales[rows])
            assert sorted(torch.cat([p.scales for p in parts]).tolist()) == sorted(full.scales.tolist())


def test_fp8_model_on_cpu_mostly_agrees_with_bf16_on_greedy_tokens(tmp_path):
    """Each linear layer errs by about 4% (e4m3 rounding of weights and activations); on a random
    3-layer model with no redundancy the 12 of them add up to 10-20% of the logits, so near ties flip.
    Judged position by position on bf16's own greedy continuation (teacher forcing), so that one flip
    does not decide the rest; a broken layer (wrong scale, wrong rows) would agree on almost nothing."""
    folder = make_tiny_llama(tmp_path / "tiny", num_layers=3, hidden_size=128)
    fp8, bf16 = load(folder), load(folder, quantization="none")
    gen = torch.Generator().manual_seed(0)
    agree, first, errors = [], 0, []
    for prompt in [torch.randint(3, 380, (6,), generator=gen).tolist() for _ in range(8)]:
        tokens = prompt + greedy(bf16, prompt, 16)
        reference, logits = (forward_logits(model, tokens)[len(prompt) - 1 : -1] for model in (bf16, fp8))
        same = (logits.argmax(dim=-1) == reference.argmax(dim=-1)).tolist()
        agree += same
        first += same[0]
        errors.append(float((logits - reference).norm() / reference.norm()))
    assert sum(agree) >= 0.65 * len(agree) and first >= 6, (sum(agree) / len(agree), first)
    assert max(errors) < 0.3, errors


def test_prequantized_checkpoint_loads_as_stored(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny")
    fp8_folder = write_fp8_checkpoint(folder, tmp_path / "fp8")
    stored, quantized = load(fp8_folder), load(folder)
    for name in LINEARS:
        a, b = stored.layers[0].get_submodule(name).rows_(), quantized.layers[0].get_submodule(name).rows_()
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scales, b.scales)
    per_tensor = stored.layers[1].self_attn.o_proj.weight_scale
    assert (per_tensor == per_tensor[0]).all()  # one scale for the whole tensor, given to every row
    expected = load_file(fp8_folder / "model.safetensors")["model.layers.1.self_attn.o_proj.weight_scale"]
    assert per_tensor[0] == expected


def test_prequantized_checkpoint_errors_name_the_tensor(tmp_path):
    folder = write_fp8_checkpoint(make_tiny_llama(tmp_path / "tiny"), tmp_path / "fp8")
    with pytest.raises(ModelSourceError, match=r"tensor model.layers.0.\S+_proj.weight is stored as F8_E4M3.*quantization 'fp8'"):
        load(folder, quantization="none")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(
        ModelSourceError, match=r"model.layers.0.mlp.up_proj.weight is float8_e4m3fn but its scale .*weight_scale is missing"
    ):
        load(folder)


def test_engine_refuses_fp8_on_a_cpu_naming_the_device(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny")
    with pytest.raises(QuantizationError, match=r"needs a CUDA GPU with FP8 matrix units .*; device is cpu"):
        LLM(str(folder), quantization="fp8", device="cpu")


def load(folder: Path, tp: TensorParallel | None = None, quantization: str = "fp8") -> LlamaForCausalLM:
    """The loader's model on CPU in bf16 (the engine refuses fp8 on a CPU; the loader and layers run)."""
    arch = ModelArch.from_folder(folder)
    return load_model(folder, arch, torch.bfloat16, torch.device("cpu"), 64, tp or TensorParallel(), quantization=quantization)


def write_fp8_checkpoint(folder: Path, out: Path) -> Path:
    """`folder` as a compressed-tensors-style FP8 checkpoint: decoder weights in e4m3 with a float32
    `weight_scale` per row ([rows, 1]; one o_proj per tensor), quantized from their bf16 values as the
    loader would, plus a static `input_scale` that the loader ignores."""
    out.mkdir()
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (out / item.name).write_bytes(item.read_bytes())
    weights = load_file(folder / "model.safetensors")
    for name in [n for n in weights if ".layers." in n and n.endswith("proj.weight")]:
        w = weights[name].to(torch.bfloat16)
        if name == "model.layers.1.self_attn.o_proj.weight":
            scale = w.float().abs().max() / FP8_MAX
            rows = Fp8Rows((w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reshape(1))
        else:
            rows = quantize_fp8(w)
        weights[name] = rows.data
        weights[f"{name}_scale"] = rows.scales.reshape(-1, 1) if rows.scales.numel() > 1 else rows.scales
        weights[name.replace(".weight", ".input_scale")] = torch.tensor([0.01])
    save_file(weights, str(out / "model.safetensors"))
    return out


@torch.inference_mode()
def forward_logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """float32 logits [len(tokens), vocab], the whole sequence as one prefill over a fresh cache."""
    arch, n = model.arch, len(tokens)
    cache = torch.zeros(n // 16 + 2, 16, arch.num_kv_heads, arch.head_dim, dtype=torch.bfloat16)
    caches = [(cache.clone(), cache.clone()) for _ in model.layers]
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n, n, None)])
    return model.compute_logits(model(torch.tensor(tokens), torch.arange(n), caches, meta)).float()


def greedy(model: LlamaForCausalLM, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens, each step recomputing the whole sequence."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(forward_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]
