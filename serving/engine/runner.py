"""The seam between the engine and whatever computes a step's logits.

The engine turns its scheduling decision into a `StepInput` (plain data: it travels to Ray workers
as is) and hands it to a `Runner`: `ModelRunner` in this process, `RayExecutor` over worker actors,
or `DeepSpeedRunner`. `make_runner` (serving/engine/make_runner.py) picks one from the config.
This module imports nothing from the engine, so `serving/parallel` can implement the interface
without depending on the engine that drives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from serving.config import CPU_KV_CACHE_GB, CUDA_KV_CACHE_FRACTION, CUDA_RESERVED_GB, LLMConfig
from serving.models.sharding import PipelineStage, TensorParallel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SeqChunk:
    """One sequence's share of a step."""

    token_ids: list[int]  # the tokens to compute this step
    start: int  # position of the first of them (= tokens already in the KV cache)
    block_table: list[int]
    sample: bool  # the chunk ends the sequence: its last position's logits are sampled
    prompt_logits: bool  # also return the logits of every position (prompt logprobs)


@dataclass
class StepInput:
    chunks: list[SeqChunk]
    block_copies: list[tuple[int, int]]  # (src, dst) KV block copies to make before the step


@dataclass
class StepLogits:
    sample_logits: torch.Tensor  # [S, V]: one row per chunk with sample=True, in chunk order
    prompt_logits: dict[int, torch.Tensor]  # chunk index -> [n, V] logits of all its positions


class Runner(Protocol):
    """What the engine drives. `submit` launches a step and returns a handle; `collect` waits for
    that step's logits. A runner in this process computes in `submit`; an executor over pipeline
    stages takes several steps before the first is collected."""

    device: torch.device  # where the logits land (the engine samples there)
    num_blocks: int  # KV cache blocks every rank holds

    def submit(self, step: StepInput) -> object: ...

    def collect(self, handle: object) -> StepLogits: ...


class ShardRunner(Runner, Protocol):
    """A runner a Worker actor builds for its rank (ShardRunnerClass); `execute` runs the rank's part of
    a step and returns the logits on the ranks of the last stage, None elsewhere."""

    def execute(self, step: StepInput) -> StepLogits | None: ...


class ShardRunnerClass(Protocol):
    """ModelRunner or DeepSpeedRunner: one rank's runner, the whole model when `tp` and `stage` are left out."""

    def __call__(
        self, folder: Path, config: LLMConfig, max_model_len: int, tp: TensorParallel = ..., stage: PipelineStage = ...
    ) -> ShardRunner: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def kv_cache_blocks(budget_gb: float | None, device: torch.device, bytes_per_block: int, block_size: int, max_model_len: int) -> int:
    """How many KV blocks the budget holds: `budget_gb` when set, else the defaults in serving/config.py
    (a fixed size on CPU; on CUDA a fraction of the free memory, less room for activations and graphs).
    Raises ValueError when that is less than one sequence of `max_model_len`."""
    if budget_gb is not None:
        budget = budget_gb * 2**30
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = CUDA_KV_CACHE_FRACTION * free - CUDA_RESERVED_GB * 2**30
    else:
        budget = CPU_KV_CACHE_GB * 2**30
    num_blocks = int(budget // bytes_per_block)
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"KV cache budget holds {num_blocks * block_size} tokens, fewer than one sequence of "
            f"max_model_len {max_model_len}; raise kv_cache_memory_gb or lower max_model_len"
        )
    return num_blocks
