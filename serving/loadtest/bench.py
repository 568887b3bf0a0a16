"""One benchmark from start to finish: build the workload, run each load point, assemble the result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from serving.loadtest.client import Target
from serving.loadtest.load import LoadPoint, run_load
from serving.loadtest.report import point_record
from serving.loadtest.workloads import RequestSpec, file_requests, random_requests, shared_prefix_requests
from serving.tokenizer import Tokenizer


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send. "random" and "prefix" need the served model's tokenizer; "file" reads a JSONL file."""

    kind: Literal["random", "file", "prefix"] = "random"
    num_prompts: int = 256
    input_len: int = 16
    output_len: int = 128
    prefix_len: int = 256  # "prefix": shared tokens in front of each prompt's input_len unique ones
    num_prefixes: int = 1
    prompt_file: Path | None = None
    seed: int = 0

    def build(self, tokenizer: Tokenizer | None) -> list[RequestSpec]:
        if self.kind == "file":
            if self.prompt_file is None:
                raise ValueError("the file workload needs a prompt file")
            return file_requests(self.prompt_file, self.output_len, tokenizer)
        if tokenizer is None:
            raise ValueError(f"the {self.kind} workload needs the served model's tokenizer (--tokenizer FOLDER)")
        if self.kind == "prefix":
            return shared_prefix_requests(
                tokenizer,
                self.num_prompts,
                self.prefix_len,
                self.input_len,
                self.output_len,
                self.num_prefixes,
                self.seed,
            )
        return random_requests(tokenizer, self.num_prompts, self.input_len, self.output_len, self.seed)

    def to_dict(self) -> dict[str, Any]:
        fields = {"kind": self.kind, "num_prompts": self.num_prompts, "output_len": self.output_len, "seed": self.seed}
        if self.kind == "file":
            return fields | {"prompt_file": str(self.prompt_file)}
        fields["input_len"] = self.input_len
        if self.kind == "prefix":
            fields |= {"prefix_len": self.prefix_len, "num_prefixes": self.num_prefixes}
        return fields


@dataclass(frozen=True)
class RunSpec:
    """How each load point runs: its bounds, warm-up and goodput limits."""

    num_requests: int | None = 64
    duration_s: float | None = None
    warmup: int = 1
    seed: int = 0
    slo_ms: dict[str, float] = field(default_factory=dict)
    progress: bool = True


async def run_points(target: Target, workload: Sequence[RequestSpec], points: Sequence[LoadPoint], spec: RunSpec) -> list[dict[str, Any]]:
    """Run every load point in turn against `target`; returns their result records."""
    records = []
    for point in points:
        run = await run_load(target, workload, point, spec.num_requests, spec.duration_s, spec.warmup, spec.seed, spec.progress)
        records.append(point_record(point, run, spec.slo_ms or None))
        summary = records[-1]["summary"]
        if spec.progress:
            print(
                f"{point.label}: {summary['completed']} ok, {summary['failed']} failed, "
                f"{summary['output_throughput']:.1f} output tok/s in {summary['duration_s']:.1f} s",
                flush=True,
            )
    return records
