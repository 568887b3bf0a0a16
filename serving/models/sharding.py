"""Which part of the model one rank holds: its tensor-parallel slice and its pipeline stage's layers,
and the collectives between ranks that the layers call.

Tensor parallelism (column-parallel: q/k/v and gate/up rows split by head / by intermediate unit;
row-parallel: o_proj and down_proj columns split the same way, their partial outputs summed with one
all-reduce each; the embedding and LM head split by vocabulary rows; with more ranks than KV heads,
each KV head is replicated on tp / num_kv_heads ranks). Pipeline stages: contiguous runs of decoder
layers, hidden states passed stage to stage. `serving/parallel` starts the ranks and builds these
descriptions for them; the model and its loader only read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from serving.errors import UnsupportedModelError
from serving.models.arch import ModelArch


class InvalidLayoutError(UnsupportedModelError):
    """The requested tensor/pipeline layout does not fit the model or the cluster."""


@dataclass(frozen=True)
class TensorParallel:
    size: int = 1
    rank: int = 0
    group: object | None = None  # the torch.distributed process group of this TP group

    def check(self, arch: ModelArch) -> None:
        if arch.num_heads % self.size:
            raise InvalidLayoutError(f"tensor parallel size {self.size} does not divide the model's {arch.num_heads} attention heads")
        if arch.intermediate_size % self.size:
            raise InvalidLayoutError(f"tensor parallel size {self.size} does not divide the MLP width {arch.intermediate_size}")
        kv = arch.num_kv_heads
        if kv % self.size and self.size % kv:
            raise InvalidLayoutError(f"tensor parallel size {self.size} neither divides nor is a multiple of the model's {kv} KV heads")

    def local_heads(self, arch: ModelArch) -> int:
        return arch.num_heads // self.size

    def local_kv_heads(self, arch: ModelArch) -> int:
        return max(1, arch.num_kv_heads // self.size)

    def first_kv_head(self, arch: ModelArch) -> int:
        """Index of this rank's first KV head (ranks sharing a replicated head get the same index)."""
        if arch.num_kv_heads >= self.size:
            return self.rank * self.local_kv_heads(arch)
        return self.rank * arch.num_kv_heads // self.size

    def vocab_range(self, arch: ModelArch) -> tuple[int, int]:
        """[start, end) of this rank's vocabulary rows; the last rank may hold fewer."""
        per_rank = -(-arch.vocab_size // self.size)
        start = min(self.rank * per_rank, arch.vocab_size)
        return start, min(start + per_rank, arch.vocab_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor, arch: ModelArch) -> torch.Tensor:
        """Concatenate every rank's vocabulary slice of the logits into full rows."""
        if self.size == 1:
            return logits
        per_rank = -(-arch.vocab_size // self.size)
        padded = torch.nn.functional.pad(logits, (0, per_rank - logits.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts, dim=-1)[..., : arch.vocab_size]


@dataclass(frozen=True)
class PipelineStage:
    size: int = 1
    rank: int = 0
    prev_rank: int | None = None  # global rank this rank receives hidden states from
    next_rank: int | None = None  # global rank it sends them to

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def check(self, arch: ModelArch) -> None:
        if self.size > arch.num_layers:
            raise InvalidLayoutError(f"{self.size} pipeline stages for a model of only {arch.num_layers} layers")

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of this stage's layers; earlier stages take one more when they don't divide evenly."""
        base, extra = divmod(num_layers, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def receive(self, like: torch.Tensor) -> torch.Tensor:
        hidden = torch.empty_like(like)
        dist.recv(hidden, src=self.prev_rank)
        return hidden

    def send(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous(), dst=self.next_rank)


SINGLE = TensorParallel()
SINGLE_STAGE = PipelineStage()


def check_layout(arch: ModelArch, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Refuse a layout the model cannot be split into (InvalidLayoutError)."""
    TensorParallel(tensor_parallel).check(arch)
    PipelineStage(pipeline_parallel).check(arch)
