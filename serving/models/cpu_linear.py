"""Linear layers for float32 CPU inference on our own kernels (serving/models/cpu_kernels.c).

torch's CPU linear (MKL) and oneDNN with prepacked weights are both slow on the skinny matrices
of decoding: on this project's AVX2 machine our panel-packed kernels ran the model's projections
1.5-2.3x faster than prepacked oneDNN at 1-8 rows and 1.2-1.4x at 32 (`python -m
benchmarks.cpu_kernels_bench`). The bias, the residual add after o_proj/down_proj and the SiLU
gate product are fused into the same call.
"""
from __future__ import annotations

import torch
from torch import nn

from serving.models.cpu_kernels import CpuKernels, to_gate_up_panels, to_panels
from serving.models.llama import GateUpProjection


class PanelLinear(nn.Module):
    """y = x W^T + b (+ residual, fused into the same call) with W packed into panels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: CpuKernels) -> None:
        super().__init__()
        self.kernels = kernels
        self.out_features = weight.shape[0]
        self.register_buffer("panels", to_panels(weight.detach()))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).contiguous()
        if residual is not None:
            residual = residual.reshape(rows.shape[0], -1).contiguous()
        out = self.kernels.linear(rows, self.panels, self.out_features, self.bias, residual)
        return out.view(*shape[:-1], self.out_features)


class PanelGateUp(nn.Module):
    """silu(x Wg^T) * x Wu^T in one call, gate and up rows interleaved in the panels."""

    def __init__(self, gate_up_weight: torch.Tensor, kernels: CpuKernels) -> None:
        super().__init__()
        self.kernels = kernels
        gate, up = gate_up_weight.detach().chunk(2, dim=0)
        self.width = gate.shape[0]
        self.register_buffer("panels", to_gate_up_panels(gate, up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        return self.kernels.gate_up(rows, self.panels, self.width).view(*x.shape[:-1], self.width)


def pack_linears(model: nn.Module, kernels: CpuKernels) -> None:
    """Replace every nn.Linear of a float32 CPU model by its panel version, in place, one at a time
    (GateUpProjection by PanelGateUp, any other by PanelLinear).

    Only names are collected up front, so each original weight is freed as soon as it is packed
    and peak memory grows by one layer, not by the whole model.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if isinstance(linear, GateUpProjection):
            packed = PanelGateUp(linear.weight, kernels)
        else:
            packed = PanelLinear(linear.weight, linear.bias, kernels)
        setattr(parent, attr, packed)
        del linear
