"""FP8 (e4m3) linear layers for GPUs with FP8 matrix units (compute capability 8.9 or newer).

Weights are float8_e4m3fn with one float32 scale per output row, w = q * scale (scale = the row's
largest magnitude / 448, e4m3's largest value; an all-zero row has scale 0). Each forward quantizes
its input per token: every row of activations gets its own scale (its largest magnitude / 448), so an
outlier token does not cost the others their precision; then `torch._scaled_mm` multiplies the two
e4m3 matrices on the FP8 units and applies both row-wise scales, writing the model dtype (bf16 or
fp16). Shapes stay those of the batch and nothing is read back to the host, so CUDA graphs capture
the forward as they do the float one.

Only the decoder's projections (q/k/v, o, gate/up, down) are FP8; the embedding and the LM head stay
in the model dtype: a lookup reads one row per token, so a smaller embedding saves no bandwidth, and
the LM head keeps full precision on the logits that greedy decoding and sampling compare.

Tensor parallelism slices quantized rows: a column-parallel slice (rows) takes its rows' scales, a
row-parallel slice (inputs) keeps every row's scale, so each rank's partial sums add up to the
single-worker product. `read_checkpoint_rows` reads pre-quantized checkpoints (compressed-tensors'
FP8 layout: an F8_E4M3 `X.weight` beside a float `X.weight_scale` per row or per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import torch
import torch.nn.functional as F
from torch import nn

from serving.models.quant import QuantizationError
from serving.models.safetensors_reader import SafetensorsFile

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
ALIGNMENT = 16  # _scaled_mm on CUDA needs inputs and outputs in multiples of 16
_MIN_AMAX = 1e-12  # an all-zero activation row quantizes to zeros with this (any nonzero) scale


@dataclass
class Fp8Rows:
    """e4m3 rows of one weight matrix [rows, cols] and their float32 scales [rows]."""

    data: torch.Tensor
    scales: torch.Tensor

    def narrow(self, dim: int, start: int, length: int) -> Fp8Rows:
        """Rows (dim 0, with their scales) or inputs (dim 1, every row keeping its scale) [start, start + length)."""
        if dim == 0:
            return Fp8Rows(self.data.narrow(0, start, length), self.scales.narrow(0, start, length))
        return Fp8Rows(self.data.narrow(1, start, length), self.scales)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]: q * scale."""
        return self.data.float() * self.scales[:, None]


def quantize_fp8(weights: torch.Tensor) -> Fp8Rows:
    """Quantize float rows [rows, cols] to e4m3, one scale per row (on the device they are on)."""
    weights = weights.float()
    scales = weights.abs().amax(dim=1) / FP8_MAX
    q = (weights / torch.where(scales == 0, 1.0, scales)[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8Rows(q, scales)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows of x [tokens, inputs] and their float32 scales [tokens, 1], one per token.

    Five kernels: the row maxima (one reduction, in float32), two for the scales, the scaled values
    and their cast. x / scale stays within +-448, up to a rounding that the cast rounds back to 448."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scales = amax.clamp_(min=_MIN_AMAX).div_(FP8_MAX)
    return (x / scales).to(FP8), scales


class Fp8Linear(nn.Module):
    """y = x W^T (+ bias) (+ residual), or silu(x Wg^T) * x Wu^T when `gated` (gate rows, then up rows),
    with W in e4m3 and x quantized per token inside the forward (see the module docstring)."""

    kind = "fp8"

    def __init__(self, out_features: int, in_features: int, bias: bool, gated: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if out_features % ALIGNMENT or in_features % ALIGNMENT:
            raise QuantizationError(
                f"fp8 needs inputs and outputs in multiples of {ALIGNMENT}; this matrix is {out_features} x {in_features}"
            )
        self.out_features, self.in_features, self.gated, self.dtype = out_features, in_features, gated, dtype
        self.rows, self.cols = out_features, in_features  # the loader's names for the shape it fills
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def load_rows(self, start: int, part: Fp8Rows) -> None:
        """Fill rows [start, start + len(part)) and their scales."""
        count = part.data.shape[0]
        self.weight[start : start + count] = part.data
        self.weight_scale[start : start + count] = part.scales

    def rows_(self) -> Fp8Rows:
        return Fp8Rows(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        q, scales = quantize_activations(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            q,
            self.weight.t(),  # column-major, as the FP8 matrix units want the second operand
            scale_a=scales,
            scale_b=self.weight_scale.view(1, -1),
            bias=self.bias,
            out_dtype=x.dtype,
            use_fast_accum=True,
        )
        if self.gated:
            gate, up = out.chunk(2, dim=-1)
            out = F.silu(gate).mul_(up)
        if residual is not None:
            out = out.add_(residual.reshape(out.shape))
        return out.view(*x.shape[:-1], out.shape[-1])


def read_checkpoint_rows(reader: SafetensorsFile, name: str, f: BinaryIO) -> Fp8Rows:
    """A pre-quantized e4m3 weight and its scale `{name}_scale`: one per row ([rows] or [rows, 1]) or
    one for the whole tensor ([] or [1], as compressed-tensors writes for its per-tensor strategy)."""
    return Fp8Rows(*reader.weight_and_scales(name, f, FP8, per_tensor=True))
