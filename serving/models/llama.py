"""A Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV cache.

Inputs are a flattened batch of tokens from many sequences; q/k/v and gate/up projections are
fused into one matrix each (the loader concatenates the checkpoint's separate weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serving.models.arch import ModelArch
from serving.models.attention import AttentionMetadata, paged_attention, store_kv
from serving.models.sharding import SINGLE, SINGLE_STAGE, PipelineStage, TensorParallel

Slice = tuple[int, int, int]  # (dim, start, length) of a checkpoint tensor


@dataclass(frozen=True)
class WeightSlices:
    """Which part of its checkpoint tensors a layer of this rank holds, one entry per tensor fused into
    the layer (q, k, v; gate, up; or just the one): the rows it fills in the layer's weight (offset,
    count), and the slice of the checkpoint tensor they come from (None: all of it). A slice along
    dim 1 (a row-parallel layer's inputs) leaves the 1-D bias whole."""

    rows: tuple[tuple[int, int], ...] | None  # None: the one tensor fills the whole weight
    source: tuple[Slice | None, ...]


def _split(tp: TensorParallel, dim: int, start: int, length: int) -> Slice | None:
    return None if tp.size == 1 else (dim, start, length)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; lower precisions keep the float32 math spelled out as in HF
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class ResidualLinear(nn.Linear):
    """A linear layer that can add a residual to its output (the packed CPU version fuses the add)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        return out if residual is None else out.add_(residual)


class GateUpProjection(nn.Linear):
    """Gate and up projections as one matrix, returning the gated product `silu(x Wg^T) * x Wu^T`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = super().forward(x).chunk(2, dim=-1)
        return F.silu(gate).mul_(up)


def row_parallel(linear: ResidualLinear, x: torch.Tensor, residual: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """`residual` plus a row-parallel projection of `x` summed over the TP group. On one rank the
    add happens inside the linear; across ranks it must wait for the all-reduce of the partial sums."""
    if tp.size == 1:
        return linear(x, residual)
    return tp.all_reduce(linear(x)).add_(residual)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama-3 scaling when configured."""
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim))
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by token position (rotate-half layout, as in HF).

    The sine table's first half is negated, so rotating is `x * cos + roll(x, half) * sin`."""

    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(arch))
        self.register_buffer("cos", torch.cat((freqs, freqs), dim=-1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((-freqs, freqs), dim=-1).sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] for the given positions, computed once per step for all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + cat(-x2, x1) * sin` in three kernels: `sin` carries the sign of the first half."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    """Self-attention over this rank's heads; o_proj's partial sums are all-reduced across the TP group."""

    def __init__(self, arch: ModelArch, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = tp.local_heads(arch), tp.local_kv_heads(arch), arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias)
        self.o_proj = ResidualLinear(self.q_size, arch.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        q, kv, first_kv = self.q_size, self.kv_size, tp.first_kv_head(arch) * self.head_dim  # by head
        kv_slice = _split(tp, 0, first_kv, kv)
        self.qkv_proj.weight_slices = WeightSlices(((0, q), (q, kv), (q + kv, kv)), (_split(tp, 0, tp.rank * q, q), kv_slice, kv_slice))
        self.o_proj.weight_slices = WeightSlices(None, (_split(tp, 1, tp.rank * q, q),))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """`residual` plus the attention output of the normalised hidden states `x`."""
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = apply_rotary(qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim), *rope)  # q and k at once
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        store_kv(k, v, kv_cache, meta.slot_mapping)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return row_parallel(self.o_proj, out.reshape(t, self.q_size), residual, self.tp)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        width = arch.intermediate_size // tp.size
        self.gate_up_proj = GateUpProjection(arch.hidden_size, 2 * width, bias=False)
        self.down_proj = ResidualLinear(width, arch.hidden_size, bias=False)
        part = _split(tp, 0, tp.rank * width, width)
        self.gate_up_proj.weight_slices = WeightSlices(((0, width), (width, width)), (part, part))
        self.down_proj.weight_slices = WeightSlices(None, (_split(tp, 1, tp.rank * width, width),))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual` plus the MLP output of the normalised hidden states `x`."""
        return row_parallel(self.down_proj, self.gate_up_proj(x), residual, self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, tp)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch, tp)

    def forward(self, x, rope, kv_cache, meta) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x), rope, kv_cache, meta, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class LlamaForCausalLM(nn.Module):
    """The decoder, or one rank's part of it: a tensor-parallel shard (vocabulary split by rows)
    of one pipeline stage's layers. Only the first stage embeds, only the last normalises and
    produces logits (a tied last stage holds the embedding for its LM head)."""

    def __init__(self, arch: ModelArch, max_positions: int, tp: TensorParallel = SINGLE, stage: PipelineStage = SINGLE_STAGE) -> None:
        super().__init__()
        self.arch = arch
        self.tp = tp
        self.stage = stage
        self.first_layer, last_layer = stage.layer_range(arch.num_layers)
        self.vocab_start, vocab_end = tp.vocab_range(arch)
        local_vocab = vocab_end - self.vocab_start
        needs_embedding = stage.is_first or (stage.is_last and arch.tie_word_embeddings)
        self.embed_tokens = nn.Embedding(local_vocab, arch.hidden_size) if needs_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(arch, tp) for _ in range(self.first_layer, last_layer))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps) if stage.is_last else None
        has_own_head = stage.is_last and not arch.tie_word_embeddings
        self.lm_head = nn.Linear(arch.hidden_size, local_vocab, bias=False) if has_own_head else None
        self.rotary = RotaryEmbedding(arch, max_positions)
        # all the layers of a decode-only step in one call, (x, rope, kv_caches, meta) -> x; set where the
        # layers run on the CPU kernels (cpu_layers.use_cpu_kernels)
        self.fused_decode: Callable[..., torch.Tensor] | None = None
        vocab_rows = WeightSlices(None, (_split(tp, 0, self.vocab_start, local_vocab),))
        for layer in (self.embed_tokens, self.lm_head):
            if layer is not None:
                layer.weight_slices = vocab_rows

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after this stage's layers (normalised on the last stage).

        The first stage starts from `input_ids`; later stages from the previous stage's `hidden`.
        """
        x = self._embed(input_ids) if hidden is None else hidden
        rope = self.rotary(positions, x.dtype)
        if self.fused_decode is not None and not meta.prefills:
            x = self.fused_decode(x, rope, kv_caches, meta)
        else:
            meta.prepare_decode_mask(kv_caches[0][0].shape[1], x.dtype)
            for layer, kv_cache in zip(self.layers, kv_caches):
                x = layer(x, rope, kv_cache, meta)
        return self.norm(x) if self.norm is not None else x

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.embed_tokens(input_ids)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed_tokens.num_embeddings)
        x = self.embed_tokens(local.clamp(0, self.embed_tokens.num_embeddings - 1))
        x = x * mine[:, None].to(x.dtype)
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (gathered from every TP rank)."""
        if self.lm_head is None:  # tied to the input embedding (held by this, the last stage)
            local = F.linear(hidden, self.embed_tokens.weight)
        else:
            local = self.lm_head(hidden)
        return self.tp.gather_vocab(local, self.arch)
