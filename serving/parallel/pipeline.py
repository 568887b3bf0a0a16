"""Pipeline stages: contiguous runs of decoder layers, hidden states passed stage to stage."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from serving.models.arch import ModelArch
from serving.parallel.tensor import InvalidLayoutError


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


SINGLE_STAGE = PipelineStage()
