"""Attention over a paged KV cache for a flattened batch of decode tokens and prefill chunks.

The flattened batch puts the decode tokens (one per sequence) first, then each prefill chunk.
Decodes run as one batched SDPA call over keys gathered through their block tables, with a
static shape (so the call can be captured in a CUDA graph); each prefill chunk runs its own
causal SDPA call. (On float32 CPU, cpu_layers.KernelAttention runs the decodes on our kernels and
the prefill chunks here.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens at [start, end) of the flattened batch."""

    start: int
    end: int
    context_len: int  # tokens attended to by the last query: cached prefix + this chunk
    block_table: torch.Tensor | None  # only needed when the chunk follows a cached prefix


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # [num_decodes]
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, keys], 0 or -inf: set by prepare_decode_mask

    def prepare_decode_mask(self, block_size: int, dtype: torch.dtype) -> None:
        """Build the decode key mask once per forward pass; every layer reuses it. It is additive (0 for a
        key in the context, -inf past it): SDPA would otherwise convert a boolean mask in every layer."""
        if self.num_decodes:
            keys = torch.arange(self.decode_block_tables.shape[1] * block_size, device=self.slot_mapping.device)
            past_end = keys[None, :] >= self.decode_context_lens[:, None]
            mask = torch.zeros(past_end.shape, dtype=dtype, device=past_end.device).masked_fill_(past_end, float("-inf"))
            self.decode_mask = mask[:, None, None, :]


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor) -> None:
    """Write the new tokens' k and v [T, KVH, D] into their cache slots."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention output [T, H, D], the new k/v already in the cache (`store_kv`)."""
    if not meta.prefills:
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[: meta.num_decodes] = _decode_attention(q[: meta.num_decodes], k_cache, v_cache, meta, scale)
    prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out)
    return out


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write each prefill chunk's attention output into its rows of `out`."""
    for chunk in meta.prefills:
        out[chunk.start : chunk.end] = _prefill_attention(q, k, v, k_cache, v_cache, chunk, scale)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, KVH, max_blocks * block_size, D] keys or values.

    index_select over whole blocks copies each block in one piece; advanced indexing (`cache[tables]`)
    copies element by element and is about 4x slower on CPU.
    """
    num_blocks, block_size, num_heads, head_dim = cache.shape
    b, nb = block_tables.shape
    gathered = cache.view(num_blocks, -1).index_select(0, block_tables.flatten())
    return gathered.view(b, nb * block_size, num_heads, head_dim).transpose(1, 2)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    keys = _gather(k_cache, meta.decode_block_tables)
    values = _gather(v_cache, meta.decode_block_tables)
    # the query heads sharing a KV head become that head's queries: no KV repeat, one kernel call
    b, num_heads, head_dim = q.shape
    grouped = q.view(b, keys.shape[1], num_heads // keys.shape[1], head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return out.reshape(b, num_heads, head_dim)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
) -> torch.Tensor:
    n = chunk.end - chunk.start
    queries = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    if chunk.context_len == n:  # no cached prefix: the chunk's own keys suffice
        keys = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        values = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        ctx = chunk.context_len
        keys = _gather(k_cache, chunk.block_table[None])[:, :, :ctx]
        values = _gather(v_cache, chunk.block_table[None])[:, :, :ctx]
        key_pos = torch.arange(ctx, device=q.device)
        query_pos = torch.arange(ctx - n, ctx, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
