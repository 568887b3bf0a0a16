"""The model's layers on our own float32 CPU kernels (serving/models/cpu_kernels.c).

torch's CPU linear (MKL) and oneDNN with prepacked weights are both slow on the skinny matrices
of decoding: on this project's AVX2 machine our panel-packed kernels ran the model's projections
1.5-2.3x faster than prepacked oneDNN at 1-8 rows and 1.2-1.4x at 32 (`python -m
benchmarks.cpu_kernels_bench`). The bias, the residual add after o_proj/down_proj and the SiLU
gate product are fused into the same call. RMSNorm and the decode attention (reading the paged
cache in place instead of gathering it) run on the kernels too: each was several torch ops.
"""
from __future__ import annotations

import torch
from torch import nn

from serving.models.cpu_kernels import CpuKernels, to_gate_up_panels, to_panels
from serving.models.llama import Attention, GateUpProjection, RMSNorm
from serving.models.quant import QuantEmbedding, QuantLinear


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


class KernelRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm, kernels: CpuKernels) -> None:
        super().__init__()
        self.kernels = kernels
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        return self.kernels.rms_norm(rows, self.weight, self.eps).view(x.shape)


def tied_lm_head(embedding: nn.Module) -> nn.Module:
    """An LM head over the input embedding's rows, to be packed into panels: a second copy of float
    rows, the same copy of quantized ones."""
    if isinstance(embedding, QuantEmbedding):
        return embedding.tie_head()
    head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
    head.weight = embedding.weight
    return head


def use_cpu_kernels(model: nn.Module, kernels: CpuKernels) -> None:
    """Run a float32 CPU model on the kernels, in place: every nn.Linear becomes its panel version
    (GateUpProjection a PanelGateUp, any other a PanelLinear), every quantized linear is packed into
    its panels, every RMSNorm a KernelRMSNorm, and attention decodes read the cache in place.

    Only names are collected up front, so each original weight is freed as soon as it is packed
    and peak memory grows by one layer, not by the whole model.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, RMSNorm))]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, attr)
        if isinstance(layer, RMSNorm):
            replacement = KernelRMSNorm(layer, kernels)
        elif isinstance(layer, GateUpProjection):
            replacement = PanelGateUp(layer.weight, kernels)
        else:
            replacement = PanelLinear(layer.weight, layer.bias, kernels)
        setattr(parent, attr, replacement)
        del layer
    for module in model.modules():
        if isinstance(module, Attention):
            module.cpu_kernels = kernels
        elif isinstance(module, QuantLinear):
            module.pack(kernels)
