"""Quantization on CPU: int8 and 4-bit weights; float32 activations, or int8 ones for int4's layers.

Two storage kinds, both in GGUF's block layouts so that GGUF files load without any loss:
- "q8": int8 q, w = q * scale, a float32 scale per output row and `group` inputs. Load-time
  int8 quantization uses one group per row (per output channel, symmetric); GGUF's Q8_0 is group 32.
- "q4": 4-bit q in 0..15, w = q * d + m with float16 d and m per output row and 32 inputs (GGUF's
  Q4_1; Q4_0, w = d * (q - 8), is m = -8 d). Within each group of 32, byte j holds input j in its
  low nibble and input j + 16 in its high nibble.

While the model loads, a QuantLinear holds its rows in this row-major form; `pack` rearranges them
into the panels of the CPU kernels (serving/models/cpu_kernels.c), where all products happen.
The layers of `int4` (quantized at load) take their inputs as int8 (`int8_inputs`: per row and 32
inputs, scale max|x| / 127) and sum the products as integers, as llama.cpp does for its 4-bit types:
on AVX2 the 4-bit weights cannot be widened to float fast enough to keep up with memory
(benchmarks/README.md). GGUF files served in their own precision keep float inputs, so that they give
the float model of their dequantized weights; so does int8 ("activations stay float").
Quantizing at load time works tensor by tensor, so peak memory is the quantized model plus one
float tensor. Row-parallel slices (tensor parallelism splits inputs) are cut after quantizing the
whole row, so every slice carries its row's scale and the slices sum to the single-worker result.
The embedding and LM head are quantized to int8 in both int8 and int4 (EMBEDDING_KIND); tied ones
share one copy of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serving.errors import UnsupportedModelError
from serving.models.cpu_kernels import CpuKernels, load_cpu_kernels, unavailable_reason

GROUP = 32  # inputs per q4 scale/min, and per Q8_0 scale
KINDS = {"int8": "q8", "int4": "q4"}  # load-time quantization formats -> storage kind of the linear layers
# ... and of the embedding and LM head, in both: at 4 bits they cost the default model 5.4% perplexity,
# at 8 bits 0.3% (benchmarks/README.md), and 8 bits keep int4's weights within 0.18x of float32's
EMBEDDING_KIND = "q8"


class QuantizationError(UnsupportedModelError):
    """A quantization format cannot be used with this model, checkpoint or device."""


@dataclass
class QuantRows:
    """Quantized rows of one weight matrix [rows, cols], row-major (see the module docstring)."""

    kind: str
    data: torch.Tensor  # q8: int8 [rows, cols]; q4: uint8 [rows, cols / 2]
    scales: torch.Tensor  # q8: float32 [rows, cols / group]; q4: float16 [rows, cols / 32]
    mins: torch.Tensor | None  # q4: float16 [rows, cols / 32]
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.data.shape[1] * (2 if self.kind == "q4" else 1)

    def narrow(self, dim: int, start: int, length: int) -> QuantRows:
        """Rows (dim 0) or inputs (dim 1) [start, start + length); input cuts must fall on group edges."""
        if dim == 0:
            mins = None if self.mins is None else self.mins.narrow(0, start, length)
            return QuantRows(self.kind, self.data.narrow(0, start, length), self.scales.narrow(0, start, length), mins, self.group)
        if self.kind == "q8" and self.scales.shape[1] == 1:  # one scale per row: every slice keeps it
            return QuantRows("q8", self.data.narrow(1, start, length), self.scales, None, length)
        if start % self.group or length % self.group:
            raise QuantizationError(
                f"a slice of inputs [{start}, {start + length}) does not fall on the {self.group}-input groups of {self.kind}"
            )
        groups = (start // self.group, length // self.group)
        per_byte = 2 if self.kind == "q4" else 1
        data = self.data.narrow(1, start // per_byte, length // per_byte)
        mins = None if self.mins is None else self.mins.narrow(1, *groups)
        return QuantRows(self.kind, data, self.scales.narrow(1, *groups), mins, self.group)

    def select_rows(self, index: torch.Tensor) -> QuantRows:
        mins = None if self.mins is None else self.mins[index]
        return QuantRows(self.kind, self.data[index], self.scales[index], mins, self.group)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], computed as GGUF's reference dequantization does (multiply, then add)."""
        rows, cols = self.shape
        if self.kind == "q8":
            return (self.data.float().view(rows, -1, self.group) * self.scales[..., None]).view(rows, cols)
        bytes_ = self.data.view(rows, -1, GROUP // 2)
        q = torch.cat((bytes_ & 15, bytes_ >> 4), dim=-1).float()
        return (q * self.scales.float()[..., None] + self.mins.float()[..., None]).view(rows, cols)


def quantize(weights: torch.Tensor, kind: str) -> QuantRows:
    """Quantize float rows [rows, cols]: q8 per row (symmetric), q4 per 32 inputs (scale and min)."""
    weights = weights.float()
    rows, cols = weights.shape
    if kind == "q8":
        scales = weights.abs().amax(dim=1, keepdim=True) / 127
        q = torch.round(weights / torch.where(scales == 0, 1.0, scales)).clamp_(-127, 127).to(torch.int8)
        return QuantRows("q8", q, scales, None, cols)
    if cols % GROUP:
        raise QuantizationError(f"int4 quantizes groups of {GROUP} inputs; a matrix with {cols} inputs does not divide into them")
    groups = weights.view(rows, -1, GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    d, m = ((high - low) / 15).half(), low.half()
    scale = d.float()[..., None]
    q = torch.round((groups - m.float()[..., None]) / torch.where(scale == 0, 1.0, scale)).clamp_(0, 15).to(torch.uint8)
    data = (q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)).view(rows, cols // 2)
    return QuantRows("q4", data, d, m, GROUP)


def _storage(kind: str, rows: int, cols: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if kind == "q8":
        return torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows, cols // group), None
    return (torch.empty(rows, cols // 2, dtype=torch.uint8), torch.empty(rows, cols // GROUP, dtype=torch.float16),
            torch.empty(rows, cols // GROUP, dtype=torch.float16))  # fmt: skip


class QuantizedWeight(nn.Module):
    """Row-major quantized rows a loader fills piece by piece (see QuantRows for the layout)."""

    def __init__(self, kind: str, rows: int, cols: int, group: int) -> None:
        super().__init__()
        if cols % group:
            raise QuantizationError(f"{kind} needs inputs in groups of {group}; a matrix with {cols} inputs does not divide into them")
        self.kind, self.rows, self.cols, self.group = kind, rows, cols, group
        data, scales, mins = _storage(kind, rows, cols, group)
        self.register_buffer("data", data)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    def load_rows(self, start: int, part: QuantRows) -> None:
        if part.kind != self.kind or part.group != self.group:
            raise QuantizationError(
                f"{part.kind} rows in groups of {part.group} cannot fill a {self.kind} matrix in groups of {self.group}"
            )
        count = part.data.shape[0]
        self.data[start : start + count] = part.data
        self.scales[start : start + count] = part.scales
        if self.mins is not None:
            self.mins[start : start + count] = part.mins

    def rows_(self) -> QuantRows:
        return QuantRows(self.kind, self.data, self.scales, self.mins, self.group)


class QuantLinear(QuantizedWeight):
    """y = x W^T (+ bias) (+ residual), or silu(x Wg^T) * x Wu^T when `gated` (gate rows, then up rows),
    on the CPU kernels once `pack`ed; with `int8_inputs` (q4 only) x is quantized to int8 by the kernels."""

    def __init__(
        self, kind: str, out_features: int, in_features: int, group: int, bias: bool, gated: bool, int8_inputs: bool = False
    ) -> None:
        super().__init__(kind, out_features, in_features, group)
        if int8_inputs and kind != "q4":
            raise QuantizationError(f"int8 inputs are implemented for q4 weights, not {kind}")
        self.out_features, self.in_features, self.gated, self.int8_inputs = out_features, in_features, gated, int8_inputs
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.kernels: CpuKernels | None = None

    def pack(self, kernels: CpuKernels) -> None:
        """Rearrange the rows into kernel panels of 16 outputs (8 gate + 8 up outputs when gated)."""
        rows = self.rows_()
        if self.gated:
            width = self.rows // 2
            columns = torch.arange(-(-width // 8) * 8).view(-1, 8)
            gate = torch.where(columns < width, columns, 2 * width)  # row 2 * width: a zero row for the padding
            up = torch.where(columns < width, columns + width, 2 * width)
            rows = _pad_rows(rows, 2 * width + 1).select_rows(torch.cat((gate, up), dim=1).flatten())
        panels = -(-rows.data.shape[0] // 16)
        rows = _pad_rows(rows, panels * 16)
        self.data = _int8_input_panel(rows.data, panels) if self.int8_inputs else _panel(rows.data, panels)
        self.scales = _panel(rows.scales, panels)
        self.mins = None if rows.mins is None else _panel(rows.mins, panels)
        self.kernels = kernels

    @property
    def format(self) -> str:
        """The kernels' weight format (QUANTIZED_FORMATS in serving/models/cpu_kernels.py)."""
        return "q4_x8" if self.int8_inputs else self.kind

    def packed_rows(self, index: torch.Tensor) -> QuantRows:
        """Rows `index` of a packed, ungated layer with float inputs (row n is column n % 16 of panel n // 16)."""
        panel, column = index // 16, index % 16
        mins = None if self.mins is None else self.mins[panel, :, column]
        return QuantRows(self.kind, self.data[panel, :, column], self.scales[panel, :, column], mins, self.group)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if residual is not None:
            residual = residual.reshape(rows.shape[0], -1).contiguous()
        width = self.out_features // 2 if self.gated else self.out_features
        out = self.kernels.quantized(
            rows, self.format, self.data, self.scales, self.mins, self.group, width, self.gated, self.bias, residual
        )
        return out.view(*x.shape[:-1], width)


def _pad_rows(rows: QuantRows, count: int) -> QuantRows:
    """`count` rows, zero rows (weights 0) added at the end."""
    extra = count - rows.data.shape[0]
    mins = None if rows.mins is None else F.pad(rows.mins, (0, 0, 0, extra))
    return QuantRows(rows.kind, F.pad(rows.data, (0, 0, 0, extra)), F.pad(rows.scales, (0, 0, 0, extra)), mins, rows.group)


def _panel(values: torch.Tensor, panels: int) -> torch.Tensor:
    """[panels * 16, n] -> [panels, n, 16]."""
    return values.view(panels, 16, -1).transpose(1, 2).contiguous()


def _int8_input_panel(data: torch.Tensor, panels: int) -> torch.Tensor:
    """q4 rows [panels * 16, cols / 2] -> Q4_X8 panels [panels, 2 halves, cols / 32, 4 octets, 8 columns, 4 bytes]:
    byte i of octet o holds inputs 8 o + i (low nibble) and 8 o + 4 + i (high) of its group."""
    groups = data.shape[1] // (GROUP // 2)
    bytes_ = data.view(panels * 16, groups, GROUP // 2)
    q = torch.cat((bytes_ & 15, bytes_ >> 4), dim=-1).view(panels * 16, groups, 4, 2, 4)  # input 8 o + 4 s + i
    packed = q[..., 0, :] | (q[..., 1, :] << 4)
    return packed.view(panels, 2, 8, groups, 4, 4).permute(0, 1, 3, 4, 2, 5).contiguous()


class QuantEmbedding(QuantizedWeight):
    """Token embeddings looked up from quantized rows (expanded to float32 per looked-up row)."""

    def __init__(self, kind: str, num_embeddings: int, embedding_dim: int, group: int) -> None:
        super().__init__(kind, num_embeddings, embedding_dim, group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.head: QuantLinear | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.flatten()
        rows = self.rows_().select_rows(flat) if self.head is None else self.head.packed_rows(flat)
        return rows.dequantize().view(*ids.shape, self.embedding_dim)

    def tie_head(self) -> QuantLinear:
        """The LM head over these same rows (tied embeddings). It takes the rows over, and lookups
        read them from its panels once packed, so they are held once."""
        head = QuantLinear(self.kind, self.rows, self.cols, self.group, bias=False, gated=False)
        head.data, head.scales, head.mins = self.data, self.scales, self.mins
        self.data = self.scales = self.mins = None
        self.head = head
        return head


def require_cpu_kernels(quantization: str, device: torch.device, dtype: torch.dtype) -> CpuKernels | None:
    """The CPU kernels a quantized model runs on (None for quantization "none"), or a clear error
    when the format cannot run on this device."""
    if quantization == "none":
        return None
    if quantization == "fp8":  # runs on torch._scaled_mm (serving/models/fp8.py), not on these kernels
        if device.type != "cuda":
            raise QuantizationError(
                f"quantization 'fp8' needs a CUDA GPU with FP8 matrix units (compute capability 8.9 or newer); "
                f"device is {device.type}: use 'int8' or 'int4' on CPU"
            )
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise QuantizationError(
                f"quantization 'fp8' needs a CUDA GPU with FP8 matrix units (compute capability 8.9 or newer); "
                f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}: use quantization 'none'"
            )
        if dtype not in (torch.bfloat16, torch.float16):
            raise QuantizationError(f"quantization 'fp8' writes bfloat16 or float16 outputs; set dtype 'auto' or 'bfloat16', not {dtype}")
        return None
    if device.type != "cpu":
        raise QuantizationError(
            f"quantization {quantization!r} runs on the CPU kernels only; device is {device.type}: use quantization 'none'"
        )
    if dtype != torch.float32:
        raise QuantizationError(f"quantization {quantization!r} computes in float32; set dtype 'auto' or 'float32', not {dtype}")
    kernels = load_cpu_kernels()
    if kernels is None:
        raise QuantizationError(
            f"quantization {quantization!r} needs this project's CPU kernels, which cannot run here: {unavailable_reason()}"
        )
    return kernels
