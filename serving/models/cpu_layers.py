"""The model's layers on our own float32 CPU kernels (serving/models/cpu_kernels.c), swapped in after
the reference model is built and loaded.

Linears run on weights packed into 16-column panels, with the bias, the residual add after
o_proj/down_proj and the SiLU gate product fused into the same call; RMSNorm runs as one call;
attention applies rotary and writes the cache in one call and runs its decodes on the paged cache in
place. A step with no prefill chunk (every token a decode) goes through all the layers in one call
instead (`FusedDecode`), on one parallel region, with no Python between the layers' kernels. Why our
kernels and not torch's, with measurements: benchmarks/README.md, "Engine on CPU".
"""

from __future__ import annotations

import torch
from torch import nn

from serving.models.attention import AttentionMetadata, prefill_attention
from serving.models.cpu_kernels import (
    FLOAT_FORMAT,
    QUANTIZED_FORMATS,
    CpuKernels,
    DecodeLayer,
    PanelWeights,
    to_gate_up_panels,
    to_panels,
)
from serving.models.llama import Attention, DecoderLayer, GateUpProjection, LlamaForCausalLM, RMSNorm, row_parallel
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


class KernelAttention(nn.Module):
    """llama.Attention with rotary and the cache write in one kernel call (q/k/v left as views of the
    projection) and the decodes read from the paged cache in place; prefill chunks run as in attention.py."""

    def __init__(self, attention: Attention, kernels: CpuKernels) -> None:
        super().__init__()
        self.kernels = kernels
        self.tp = attention.tp
        self.num_heads, self.num_kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        self.q_size, self.kv_size, self.scale = attention.q_size, attention.kv_size, attention.scale
        self.qkv_proj = attention.qkv_proj
        self.o_proj = attention.o_proj

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        self.kernels.rope_store(qkv, self.num_heads, self.num_kv_heads, *rope, meta.slot_mapping, *kv_cache)
        q, k, v = (part.view(t, -1, self.head_dim) for part in qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1))
        decodes = q[: meta.num_decodes]
        if meta.num_decodes:
            decodes = self.kernels.decode_attention(decodes, *kv_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale)
        if meta.prefills:
            out = torch.empty_like(q)
            out[: meta.num_decodes] = decodes
            prefill_attention(q, k, v, *kv_cache, meta, self.scale, out)
        else:
            out = decodes
        return row_parallel(self.o_proj, out.reshape(t, self.q_size), residual, self.tp)


class FusedDecode:
    """Runs a decode-only step through all of a model's layers in one kernel call (llm_decode_layers):
    the same kernels, in the same order, as the layers' own forward passes, so the same results.

    It holds the addresses of every layer's weights, read once here (the weights do not move once
    packed), and adds the KV caches' addresses when it first sees a cache list.
    """

    def __init__(self, layers: list[DecoderLayer], intermediate_size: int, kernels: CpuKernels) -> None:
        attention = layers[0].self_attn
        self.kernels = kernels
        self.shape = (attention.num_heads, attention.num_kv_heads, attention.head_dim, intermediate_size)
        self.eps, self.scale = layers[0].input_layernorm.eps, attention.scale
        self.layers = (DecodeLayer * len(layers))(*(_decode_layer(layer) for layer in layers))
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if kv_caches is not self.caches:
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                layer.k_cache, layer.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            self.caches = kv_caches
        # updated in place, and the caller's tensor (an embedding or a received stage input) is not ours
        x = x.clone(memory_format=torch.contiguous_format)
        cos, sin = (table.reshape(x.shape[0], -1) for table in rope)
        block_size = kv_caches[0][0].shape[1]
        self.kernels.decode_layers(
            self.layers, x, self.shape, self.eps, (cos, sin), meta.slot_mapping, block_size, meta.decode_block_tables,
            meta.decode_context_lens, self.scale,
        )  # fmt: skip
        return x

    @staticmethod
    def supports(layers: list[DecoderLayer]) -> bool:
        """Whether every layer is on the kernels with the shapes llm_decode_layers takes (projections without
        biases but qkv's, one rank: a TP rank must all-reduce between the layers' halves)."""
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            if not isinstance(attention, KernelAttention) or attention.tp.size != 1 or attention.o_proj.bias is not None:
                return False
            if mlp.down_proj.bias is not None or not isinstance(layer.input_layernorm, KernelRMSNorm):
                return False
        return True


def _panel_weights(linear: nn.Module) -> PanelWeights:
    if isinstance(linear, QuantLinear):
        mins = None if linear.mins is None else linear.mins.data_ptr()
        return PanelWeights(QUANTIZED_FORMATS[linear.format], linear.data.data_ptr(), linear.scales.data_ptr(), mins, linear.group)
    return PanelWeights(FLOAT_FORMAT, linear.panels.data_ptr(), None, None, 0)


def _decode_layer(layer: DecoderLayer) -> DecodeLayer:
    attention, mlp = layer.self_attn, layer.mlp
    bias = attention.qkv_proj.bias
    return DecodeLayer(
        layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(), _panel_weights(attention.qkv_proj),
        _panel_weights(attention.o_proj), _panel_weights(mlp.gate_up_proj), _panel_weights(mlp.down_proj),
        None if bias is None else bias.data_ptr(), None, None,
    )  # fmt: skip


def _tied_lm_head(embedding: nn.Module) -> nn.Module:
    """An LM head over the input embedding's rows, to be packed into panels: a second copy of float
    rows, the same copy of quantized ones."""
    if isinstance(embedding, QuantEmbedding):
        return embedding.tie_head()
    head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
    head.weight = embedding.weight
    return head


def use_cpu_kernels(model: LlamaForCausalLM, kernels: CpuKernels) -> None:
    """Run a float32 CPU model on the kernels, in place: every nn.Linear becomes its panel version
    (GateUpProjection a PanelGateUp, any other a PanelLinear), every quantized linear is packed into
    its panels, every RMSNorm a KernelRMSNorm, every Attention a KernelAttention, and decode-only steps
    go through the layers in one call (`FusedDecode`) where the layers allow. A last stage with tied
    embeddings gets an LM head of its own first, so that the logits run on panels too.

    Only names are collected up front, so each original weight is freed as soon as it is packed
    and peak memory grows by one layer, not by the whole model.
    """
    if model.stage.is_last and model.lm_head is None:
        model.lm_head = _tied_lm_head(model.embed_tokens)
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
    for layer in model.layers:
        layer.self_attn = KernelAttention(layer.self_attn, kernels)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.pack(kernels)
    if len(model.layers) and FusedDecode.supports(list(model.layers)):
        model.fused_decode = FusedDecode(list(model.layers), model.arch.intermediate_size, kernels)
