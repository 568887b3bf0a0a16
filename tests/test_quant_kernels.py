"""The quantized CPU kernels (int8 and 4-bit weights) against the float kernels and float64 torch
over the same dequantized weights (and, for int4's int8 inputs, the same rounded inputs), and the
layouts they read."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F
from reference import int8_inputs

from serving.models import cpu_kernels
from serving.models.cpu_kernels import load_cpu_kernels, to_gate_up_panels, to_panels
from serving.models.quant import QuantLinear, QuantRows, quantize

pytestmark = pytest.mark.skipif(
    cpu_kernels.unavailable_reason() is not None, reason=f"CPU kernels cannot run here: {cpu_kernels.unavailable_reason()}"
)

# rows cover the in-register tiles (1-4) and the expanded-panel path (5+); widths cover partial panels
ROWS = [1, 2, 4, 5, 13]
SHAPES = [(576, 960), (64, 40), (96, 17)]


def q8_groups_of_32(weight: torch.Tensor) -> QuantRows:
    """GGUF Q8_0's layout: a scale per 32 inputs."""
    rows, cols = weight.shape
    scales = weight.view(rows, -1, 32).abs().amax(dim=-1) / 127
    q = torch.round(weight.view(rows, -1, 32) / scales[..., None]).to(torch.int8).view(rows, cols)
    return QuantRows("q8", q, scales, None, 32)


# weights of each format, and whether the layer takes int8 inputs: q4 with float inputs is how GGUF's Q4_1 is served
FORMATS = {
    "int8": (lambda w: quantize(w, "q8"), False),
    "q4": (lambda w: quantize(w, "q4"), False),
    "q8_0": (q8_groups_of_32, False),
    "int4": (lambda w: quantize(w, "q4"), True),
}
IN_REGISTERS = 4  # Q_ROWS in cpu_kernels.c: up to this many rows the weights are expanded in registers


def exact_path(fmt: str, batch: int) -> bool:
    """Whether the kernels give the float kernel's results bit for bit: with float inputs above IN_REGISTERS rows,
    where the panels are expanded; the in-register tiles take the scales out of the inner loop and sum in another order."""
    return not FORMATS[fmt][1] and batch > IN_REGISTERS


def inputs(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """What the layer multiplies: x, or x rounded to int8 for a layer with int8 inputs."""
    return int8_inputs(x) if FORMATS[fmt][1] else x


def linear(rows: QuantRows, bias: bool, gated: bool, rounds_inputs: bool = False) -> QuantLinear:
    out_features, in_features = rows.shape
    layer = QuantLinear(rows.kind, out_features, in_features, rows.group, bias=bias, gated=gated, int8_inputs=rounds_inputs)
    layer.load_rows(0, rows)
    if bias:
        layer.bias.data.normal_()
    layer.pack(load_cpu_kernels())
    return layer


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch", ROWS)
@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_quantized_linear_is_the_float_kernel_over_dequantized_weights(fmt, batch, in_features, out_features):
    to_rows, rounds_inputs = FORMATS[fmt]
    rows = to_rows(torch.randn(out_features, in_features))
    layer = linear(rows, bias=True, gated=False, rounds_inputs=rounds_inputs)
    weight = rows.dequantize()
    residual = torch.randn(batch, out_features)
    given = torch.randn(batch, in_features)
    out, x = layer(given, residual), inputs(fmt, given)
    if exact_path(fmt, batch):  # weights expanded exactly as dequantize() does, summed in the float kernel's order
        assert torch.equal(out, load_cpu_kernels().linear(x, to_panels(weight), out_features, layer.bias.data, residual))
    expected = x.double() @ weight.double().T + layer.bias.double() + residual.double()
    bound = x.double().abs() @ weight.double().abs().T + layer.bias.double().abs() + residual.double().abs()
    assert ((out.double() - expected).abs() <= 1e-6 * bound).all()  # float32 rounding (eps 1.2e-7) of these sums


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch", ROWS)
@pytest.mark.parametrize("in_features, width", SHAPES)
def test_quantized_gate_up_is_the_silu_product_of_dequantized_weights(fmt, batch, in_features, width):
    to_rows, rounds_inputs = FORMATS[fmt]
    rows = to_rows(torch.randn(2 * width, in_features))
    layer = linear(rows, bias=False, gated=True, rounds_inputs=rounds_inputs)
    gate, up = rows.dequantize().chunk(2)
    given = torch.randn(batch, in_features)
    out, x = layer(given), inputs(fmt, given)
    assert out.shape == (batch, width)
    if exact_path(fmt, batch):
        assert torch.equal(out, load_cpu_kernels().gate_up(x, to_gate_up_panels(gate, up), width))
    expected = F.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_int8_is_per_row_symmetric_within_half_a_step():
    weight = torch.randn(40, 96) * torch.rand(40, 1) * 3  # rows of very different ranges
    rows = quantize(weight, "q8")
    assert rows.scales.shape == (40, 1) and rows.data.dtype == torch.int8
    assert torch.equal(rows.scales[:, 0], weight.abs().amax(dim=1) / 127)
    assert ((rows.dequantize() - weight).abs() <= rows.scales / 2 * (1 + 1e-5)).all()


def test_int4_groups_of_32_cover_each_groups_range_within_half_a_step():
    weight = torch.randn(8, 128) + torch.arange(4).repeat_interleave(32) * 5  # every group its own offset
    rows = quantize(weight, "q4")
    assert rows.data.shape == (8, 64) and rows.scales.shape == rows.mins.shape == (8, 4) and rows.scales.dtype == torch.float16
    step = rows.scales.float().repeat_interleave(32, dim=1)
    # d and min are rounded to float16, so a value can sit a little past half a step
    assert ((rows.dequantize() - weight).abs() <= step * 0.5 + 2e-2).all()


def test_input_slices_keep_the_rows_scales_and_sum_to_the_whole():
    weight, x = torch.randn(24, 128), torch.randn(3, 128)
    for kind in ("q8", "q4"):
        rows = quantize(weight, kind)
        halves = [rows.narrow(1, 0, 64), rows.narrow(1, 64, 64)]
        whole = x @ rows.dequantize().T
        parts = x[:, :64] @ halves[0].dequantize().T + x[:, 64:] @ halves[1].dequantize().T
        assert torch.allclose(parts, whole, atol=1e-4)
    with pytest.raises(Exception, match="groups"):
        quantize(weight, "q4").narrow(1, 16, 64)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="this CPU runs only the AVX2 build")
@pytest.mark.parametrize("batch", [1, 3, 7, 32])
def test_avx2_and_avx512_builds_agree(batch):
    """Machines without AVX-512 run the AVX2 tiles: on this one both builds run, and the float tiles of the
    two sum in the same order (the same bits), the quantized ones within float32 rounding of each other."""
    narrow = cpu_kernels.CpuKernels(ctypes.CDLL(str(cpu_kernels.build(avx512=False))))
    wide = load_cpu_kernels()
    x, weight = torch.randn(batch, 96), torch.randn(40, 96)  # 40 outputs: an odd number of panels, the last partial
    panels, gate_up = to_panels(weight), to_gate_up_panels(*weight.chunk(2))
    assert torch.equal(narrow.linear(x, panels, 40, None, None), wide.linear(x, panels, 40, None, None))
    assert torch.equal(narrow.gate_up(x, gate_up, 20), wide.gate_up(x, gate_up, 20))
    for to_rows, rounds_inputs in FORMATS.values():
        rows = to_rows(weight)
        layer = linear(rows, bias=False, gated=False, rounds_inputs=rounds_inputs)
        outs = []
        for kernels in (narrow, wide):
            layer.kernels = kernels
            outs.append(layer(x))
        bound = x.double().abs() @ rows.dequantize().double().abs().T
        assert ((outs[0].double() - outs[1].double()).abs() <= 1e-6 * bound).all()
