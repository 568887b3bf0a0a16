"""Linear layers with oneDNN-prepacked weights, for CPU inference.

PyTorch's default CPU linear (MKL) is slow on the skinny matrices of batched decoding: at 8-32
rows oneDNN with weights reordered once ahead of time runs the model's projections 1.3-2.5x
faster, and the 49k-row LM head about 2x (see benchmarks/README.md). oneDNN also fuses what
follows a projection (SiLU, the gate product, the residual add) into the same call.
"""
from __future__ import annotations

import torch
from torch import nn

from serving.models.llama import GateUpProjection


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """y = x W^T + b (+ residual, fused into the same oneDNN call) with W in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.register_buffer("packed_weight", _pack(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if residual is None:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        else:
            out = torch.ops.mkldnn._linear_pointwise.binary(rows, residual.reshape(rows.shape[0], -1), self.packed_weight, self.bias, "add")
        return out.view(*shape[:-1], self.out_features)


class PackedGateUp(nn.Module):
    """silu(x Wg^T) * x Wu^T as two oneDNN calls, the SiLU and the product fused into them: the
    unfused version (one matmul, then chunk, silu, mul) spends more time launching kernels than computing
    them at decode batch sizes on a small model."""

    def __init__(self, gate_up_weight: torch.Tensor) -> None:
        super().__init__()
        gate, up = gate_up_weight.detach().chunk(2, dim=0)
        self.register_buffer("packed_gate", _pack(gate))
        self.register_buffer("packed_up", _pack(up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        gate = torch.ops.mkldnn._linear_pointwise(rows, self.packed_gate, None, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(rows, gate, self.packed_up, None, "mul").view(*x.shape[:-1], gate.shape[-1])


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def pack_linears(model: nn.Module) -> None:
    """Replace every nn.Linear of a float32 CPU model by its packed version, in place, one at a time
    (GateUpProjection by PackedGateUp, any other by PackedLinear).

    Only names are collected up front, so each original weight is freed as soon as it is packed
    and peak memory grows by one layer, not by the whole model.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        packed = PackedGateUp(linear.weight) if isinstance(linear, GateUpProjection) else PackedLinear(linear.weight, linear.bias)
        setattr(parent, attr, packed)
        del linear
