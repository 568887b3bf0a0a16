"""Owns the model and its KV cache on one device, and runs one scheduled step through them.

On CUDA, decode-only steps replay CUDA graphs captured for a ladder of batch sizes (the batch is
padded up to the next captured size, padding tokens write to a scratch block).
"""

from __future__ import annotations

from pathlib import Path

import torch

from serving.config import LLMConfig
from serving.engine.runner import SeqChunk, StepInput, StepLogits, kv_cache_blocks, resolve_device, resolve_dtype
from serving.models.arch import ModelArch
from serving.models.attention import AttentionMetadata, PrefillChunk
from serving.models.cpu_kernels import load_cpu_kernels
from serving.models.cpu_layers import use_cpu_kernels
from serving.models.loader import load_model
from serving.models.quant import require_cpu_kernels
from serving.models.sharding import SINGLE, SINGLE_STAGE, PipelineStage, TensorParallel

_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class ModelRunner:
    def __init__(
        self, folder: Path, config: LLMConfig, max_model_len: int, tp: TensorParallel = SINGLE, stage: PipelineStage = SINGLE_STAGE
    ) -> None:
        model_config, engine_config = config.model, config.engine
        if engine_config.num_threads:
            torch.set_num_threads(engine_config.num_threads)
        self.arch = arch = ModelArch.from_folder(folder)
        self.device = resolve_device(model_config.device)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.block_size = engine_config.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.num_kv_heads = tp.local_kv_heads(arch)
        self.stage = stage
        kernels = require_cpu_kernels(model_config.quantization, self.device, self.dtype)  # a quantized model needs them
        self.model = load_model(folder, arch, self.dtype, self.device, max_model_len, tp, stage, model_config.quantization)
        if kernels is None and self.device.type == "cpu" and self.dtype == torch.float32:
            kernels = load_cpu_kernels()
        if kernels is not None:
            use_cpu_kernels(self.model, kernels)
        bytes_per_block = 2 * len(self.model.layers) * self.num_kv_heads * arch.head_dim * self.dtype.itemsize * self.block_size
        self.num_blocks = kv_cache_blocks(engine_config.kv_cache_memory_gb, self.device, bytes_per_block, self.block_size, max_model_len)
        shape = (self.num_blocks + 1, self.block_size, self.num_kv_heads, arch.head_dim)  # +1: scratch block
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in self.model.layers
        ]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.device.type == "cuda" and not engine_config.enforce_eager and stage.size == 1:
            self._capture_graphs(engine_config.max_num_seqs)

    def submit(self, step: StepInput) -> StepLogits | None:
        """A runner in this process computes the step at once; `collect` hands its logits back."""
        return self.execute(step)

    def collect(self, handle: StepLogits | None) -> StepLogits | None:
        return handle

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepLogits | None:
        """Run this rank's part of the step; logits come back from the last pipeline stage only."""
        for src, dst in step.block_copies:
            for k_cache, v_cache in self.kv_caches:
                k_cache[dst].copy_(k_cache[src])
                v_cache[dst].copy_(v_cache[src])
        # decodes (one new token) first, then prefill chunks; `order` maps back to chunk indices
        order = sorted(range(len(step.chunks)), key=lambda i: len(step.chunks[i].token_ids) > 1)
        chunks = [step.chunks[i] for i in order]
        num_decodes = sum(len(c.token_ids) == 1 for c in chunks)
        input_ids, positions, slots = [], [], []
        for chunk in chunks:
            input_ids += chunk.token_ids
            for pos in range(chunk.start, chunk.start + len(chunk.token_ids)):
                positions.append(pos)
                slots.append(chunk.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
        if num_decodes == len(chunks) and self.graphs and num_decodes <= max(self.graphs):
            hidden = self._replay_graph(chunks, input_ids, positions, slots)
        else:
            meta = self._metadata(chunks, num_decodes, slots)
            received = None
            if not self.stage.is_first:
                received = self.stage.receive(torch.empty(len(input_ids), self.arch.hidden_size, dtype=self.dtype, device=self.device))
            hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_caches, meta, received)
            if not self.stage.is_last:
                self.stage.send(hidden)
                return None
        return self._logits(step.chunks, order, hidden)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _metadata(self, chunks: list[SeqChunk], num_decodes: int, slots: list[int]) -> AttentionMetadata:
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), num_decodes=num_decodes)
        decodes = chunks[:num_decodes]
        if decodes:
            width = max(len(c.block_table) for c in decodes)
            meta.decode_block_tables = self._tensor([c.block_table + [self.num_blocks] * (width - len(c.block_table)) for c in decodes])
            meta.decode_context_lens = self._tensor([c.start + 1 for c in decodes])
        offset = num_decodes
        for chunk in chunks[num_decodes:]:
            n = len(chunk.token_ids)
            table = self._tensor(chunk.block_table) if chunk.start else None
            meta.prefills.append(PrefillChunk(offset, offset + n, chunk.start + n, table))
            offset += n
        return meta

    def _logits(self, chunks: list[SeqChunk], order: list[int], hidden: torch.Tensor) -> StepLogits:
        """Logits for the sampled rows (in chunk order) and for chunks that want prompt logits."""
        offsets, offset = {}, 0
        for i in order:
            offsets[i] = offset
            offset += len(chunks[i].token_ids)
        sample_rows = [offsets[i] + len(c.token_ids) - 1 for i, c in enumerate(chunks) if c.sample]
        rows = hidden[torch.tensor(sample_rows, dtype=torch.long, device=hidden.device)]
        prompt_logits = {
            i: self.model.compute_logits(hidden[offsets[i] : offsets[i] + len(c.token_ids)]).float()
            for i, c in enumerate(chunks)
            if c.prompt_logits
        }
        return StepLogits(self.model.compute_logits(rows), prompt_logits)

    # CUDA graphs for decode-only steps

    def _capture_graphs(self, max_num_seqs: int) -> None:
        sizes = [b for b in _GRAPH_BATCH_SIZES if b <= max_num_seqs] or [1]
        biggest = sizes[-1]
        self._static = {
            "input_ids": torch.zeros(biggest, dtype=torch.long, device=self.device),
            "positions": torch.zeros(biggest, dtype=torch.long, device=self.device),
            "slots": torch.zeros(biggest, dtype=torch.long, device=self.device),
            "tables": torch.zeros(biggest, self.max_blocks_per_seq, dtype=torch.long, device=self.device),
            "context_lens": torch.ones(biggest, dtype=torch.long, device=self.device),
        }
        self._fill_padding(0, biggest)
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in reversed(sizes):
                meta = self._graph_metadata(b)
                args = (self._static["input_ids"][:b], self._static["positions"][:b], self.kv_caches, meta)
                self.model(*args)  # warm-up outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model(*args)
                self.graphs[b] = (graph, out)
        torch.cuda.synchronize()

    def _graph_metadata(self, b: int) -> AttentionMetadata:
        s = self._static
        return AttentionMetadata(s["slots"][:b], b, s["tables"][:b], s["context_lens"][:b])

    def _fill_padding(self, start: int, end: int) -> None:
        s = self._static
        s["input_ids"][start:end] = 0
        s["positions"][start:end] = 0
        s["slots"][start:end] = self.num_blocks * self.block_size  # the scratch block
        s["tables"][start:end] = self.num_blocks
        s["context_lens"][start:end] = 1

    def _replay_graph(self, decodes: list[SeqChunk], input_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        n = len(decodes)
        b = min(size for size in self.graphs if size >= n)
        s = self._static
        tables = torch.full((n, self.max_blocks_per_seq), self.num_blocks, dtype=torch.long)
        for i, d in enumerate(decodes):
            tables[i, : len(d.block_table)] = torch.tensor(d.block_table)
        s["input_ids"][:n].copy_(torch.tensor(input_ids), non_blocking=True)
        s["positions"][:n].copy_(torch.tensor(positions), non_blocking=True)
        s["slots"][:n].copy_(torch.tensor(slots), non_blocking=True)
        s["tables"][:n].copy_(tables, non_blocking=True)
        s["context_lens"][:n].copy_(torch.tensor([d.start + 1 for d in decodes]), non_blocking=True)
        self._fill_padding(n, b)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
