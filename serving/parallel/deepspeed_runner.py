"""Runs any Hugging Face causal LM, split by DeepSpeed's automatic tensor parallelism, behind the
same step interface as ModelRunner, so the engine's scheduler, paged KV blocks, prefix cache and
sampler work unchanged.

The model is transformers' own; DeepSpeed AutoTP shards its linears over the tensor-parallel group
(column-parallel projections, row-parallel output projections followed by an all-reduce). The KV
cache stays paged: each layer has a pool of blocks shaped like the native engine's. For every chunk
the runner gathers the sequence's past keys and values from its block table into a transformers
cache, runs the model on the new tokens, and scatters the new keys and values back into the blocks.
Decodes run together as one padded batch; prefill chunks run one at a time.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from serving.config import LLMConfig
from serving.engine.runner import SeqChunk, StepInput, StepLogits, kv_cache_blocks, resolve_device, resolve_dtype
from serving.models.sharding import SINGLE, SINGLE_STAGE, PipelineStage, TensorParallel

# DeepSpeed's shared-memory CPU all-reduce kernel crashes (SIGSEGV) on AVX2-only machines; marking
# its op incompatible makes DeepSpeed all-reduce through torch.distributed (gloo) instead.
_SHM_ALL_REDUCE_OP = "deepspeed_shm_comm"
_MISSING = "the deepspeed backend needs {} (not installed): pip install 'llm-cluster[deepspeed]'"


class DeepSpeedRunner:
    """One rank of a DeepSpeed AutoTP group (or the whole model when tp.size is 1)."""

    def __init__(
        self, folder: Path, config: LLMConfig, max_model_len: int, tp: TensorParallel = SINGLE, stage: PipelineStage = SINGLE_STAGE
    ) -> None:
        """`tp` is the rank's place in the one TP group; `stage` is always the single stage (the config refuses
        pipeline stages with this backend)."""
        try:
            from transformers import AutoModelForCausalLM
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(_MISSING.format(error.name), name=error.name) from error

        if config.engine.num_threads:
            torch.set_num_threads(config.engine.num_threads)
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.engine.block_size
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype)
        if tp.size > 1:
            model = _shard_with_deepspeed(model, tp.size, self.dtype)
        self.model = model.to(self.device).eval()
        # transformers renamed `past_key_values` to `cache`; pass whichever this version takes
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        layer_shapes = self._kv_shapes()
        bytes_per_block = sum(2 * heads * dim for heads, dim in layer_shapes) * self.block_size * self.dtype.itemsize
        self.num_blocks = kv_cache_blocks(config.engine.kv_cache_memory_gb, self.device, bytes_per_block, self.block_size, max_model_len)
        slots = (self.num_blocks + 1) * self.block_size  # +1: the block padding reads from
        self.kv_caches = [
            (
                torch.zeros(slots, heads, dim, dtype=self.dtype, device=self.device),
                torch.zeros(slots, heads, dim, dtype=self.dtype, device=self.device),
            )
            for heads, dim in layer_shapes
        ]

    @torch.inference_mode()
    def _kv_shapes(self) -> list[tuple[int, int]]:
        """(KV heads on this rank, head size) of every layer, read off a one-token forward pass."""
        from transformers import DynamicCache

        cache = DynamicCache()
        self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=True, **{self.cache_arg: cache})
        return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers]

    # serving.engine.runner.ShardRunner

    def submit(self, step: StepInput) -> StepLogits:
        return self.execute(step)

    def collect(self, handle: StepLogits) -> StepLogits:
        return handle

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepLogits:
        for src, dst in step.block_copies:
            for k_pool, v_pool in self.kv_caches:
                for pool in (k_pool, v_pool):
                    pool[dst * self.block_size : (dst + 1) * self.block_size] = pool[src * self.block_size : (src + 1) * self.block_size]
        sample_rows: dict[int, torch.Tensor] = {}
        prompt_logits: dict[int, torch.Tensor] = {}
        decodes = [i for i, c in enumerate(step.chunks) if len(c.token_ids) == 1 and not c.prompt_logits]
        if decodes:
            logits = self._run_decodes([step.chunks[i] for i in decodes])
            sample_rows.update(zip(decodes, logits))
        for i, chunk in enumerate(step.chunks):
            if i in sample_rows:
                continue
            logits = self._run_chunk(chunk)
            if chunk.sample:
                sample_rows[i] = logits[-1]
            if chunk.prompt_logits:
                prompt_logits[i] = logits.float()
        sampled = [sample_rows[i] for i, c in enumerate(step.chunks) if c.sample]
        vocab = self.model.config.get_text_config().vocab_size
        rows = torch.stack(sampled).float() if sampled else torch.empty(0, vocab)
        return StepLogits(rows, prompt_logits)

    def _slots(self, chunk: SeqChunk, end: int, start: int = 0) -> torch.Tensor:
        table, size = chunk.block_table, self.block_size
        return torch.tensor([table[p // size] * size + p % size for p in range(start, end)], dtype=torch.long, device=self.device)

    def _run_chunk(self, chunk: SeqChunk) -> torch.Tensor:
        """A prefill chunk on top of its sequence's cached past; returns its logits [n, V]."""
        from transformers import DynamicCache

        start, n = chunk.start, len(chunk.token_ids)
        past = self._slots(chunk, start)
        cache = DynamicCache(ddp_cache_data=[(k[past].transpose(0, 1)[None], v[past].transpose(0, 1)[None]) for k, v in self.kv_caches])
        positions = torch.arange(start, start + n, device=self.device)
        out = self.model(
            input_ids=torch.tensor([chunk.token_ids], device=self.device),
            position_ids=positions[None],
            cache_position=positions,
            use_cache=True,
            **{self.cache_arg: cache},
        )
        new = self._slots(chunk, start + n, start)
        for (k_pool, v_pool), layer in zip(self.kv_caches, cache.layers):
            k_pool[new] = layer.keys[0, :, start:].transpose(0, 1)
            v_pool[new] = layer.values[0, :, start:].transpose(0, 1)
        return out.logits[0]

    def _run_decodes(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """One token for each sequence, as one batch: pasts padded on the right to the longest,
        padding masked out, the new token at the same cache index in every row. Returns [B, V]."""
        from transformers import DynamicCache

        lengths = [c.start for c in chunks]
        width = max(lengths)
        scratch = self.num_blocks * self.block_size  # padding reads the spare block
        index = torch.full((len(chunks), width), scratch, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(chunks), width + 1, dtype=torch.long, device=self.device)
        for row, chunk in enumerate(chunks):
            index[row, : chunk.start] = self._slots(chunk, chunk.start)
            mask[row, : chunk.start] = 1
        mask[:, width] = 1
        cache = DynamicCache(ddp_cache_data=[(k[index].transpose(1, 2), v[index].transpose(1, 2)) for k, v in self.kv_caches])
        out = self.model(
            input_ids=torch.tensor([c.token_ids for c in chunks], device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor([[c.start] for c in chunks], device=self.device),
            cache_position=torch.tensor([width], device=self.device),
            use_cache=True,
            **{self.cache_arg: cache},
        )
        new = torch.cat([self._slots(c, c.start + 1, c.start) for c in chunks])
        for (k_pool, v_pool), layer in zip(self.kv_caches, cache.layers):
            k_pool[new] = layer.keys[:, :, width]
            v_pool[new] = layer.values[:, :, width]
        return out.logits[:, -1]


def _shard_with_deepspeed(model: torch.nn.Module, tp_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """Split the model over the default torch.distributed group (the caller has joined it)."""
    try:
        import deepspeed
        import deepspeed.ops
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(_MISSING.format(error.name), name=error.name) from error

    deepspeed.ops.__compatible_ops__[_SHM_ALL_REDUCE_OP] = False
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=dtype, replace_with_kernel_inject=False)
    return engine.module
