"""What the engine measured since it was last asked (token counts, latencies, finished requests), and the
snapshot of its state that other threads read (`EngineSnapshot`).

The engine only records plain numbers here (it must not depend on any metrics library); the LLM
replica takes them periodically (`LLMEngine.take_stats`) and turns them into Prometheus metrics.
The measurements pile up until they are taken, so only an engine whose owner takes them regularly
collects them (`collect_stats`); the request timestamps they come from are kept either way.
All times are seconds of `time.monotonic()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.engine.scheduler import ScheduledSeq
    from serving.engine.sequence import Request, Sequence

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class FinishedRequest:
    """The life of one finished request, from its arrival at the engine."""

    finish_reason: str  # one of FINISH_REASONS; with n > 1, abort before length before stop
    num_prompt_tokens: int
    num_generation_tokens: int  # over all its completions
    queue_s: float  # arrival until first scheduled
    prefill_s: float | None  # first scheduled until first token; None if it never got one
    decode_s: float | None  # first token until last token
    e2e_s: float  # arrival until finished


@dataclass
class EngineStepStats:
    """Counts and latencies accumulated over the steps since the last `take_stats`."""

    prompt_tokens: int = 0  # prompts whose prefill finished
    generation_tokens: int = 0
    time_to_first_token_s: list[float] = field(default_factory=list)
    inter_token_latency_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)

    def merge(self, later: EngineStepStats) -> None:
        """Add what `later` measured to this collection."""
        self.prompt_tokens += later.prompt_tokens
        self.generation_tokens += later.generation_tokens
        self.time_to_first_token_s += later.time_to_first_token_s
        self.inter_token_latency_s += later.inter_token_latency_s
        self.finished += later.finished

    def record_token(self, seq: Sequence, now: float) -> None:
        """A token was sampled for `seq` at `now`, before `mark_token` moved its timestamps: the request's
        first (TTFT) or one more of this sequence's (ITL)."""
        request = seq.request
        if request.first_token_time is None:
            self.time_to_first_token_s.append(now - request.arrival_time)
            self.prompt_tokens += request.num_prompt_tokens
        elif seq.last_token_time is not None:
            self.inter_token_latency_s.append(now - seq.last_token_time)
        self.generation_tokens += 1

    def record_finished(self, request: Request) -> None:
        now = time.monotonic()
        reasons = {seq.finish_reason for seq in request.seqs}
        reason = "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
        scheduled, first = request.scheduled_time, request.first_token_time
        last = max((s.last_token_time for s in request.seqs if s.last_token_time is not None), default=None)
        self.finished.append(
            FinishedRequest(
                finish_reason=reason,
                num_prompt_tokens=request.num_prompt_tokens,
                num_generation_tokens=sum(len(s.output_token_ids) for s in request.seqs),
                queue_s=(now if scheduled is None else scheduled) - request.arrival_time,
                prefill_s=None if first is None or scheduled is None else first - scheduled,
                decode_s=None if first is None or last is None else last - first,
                e2e_s=now - request.arrival_time,
            )
        )


def mark_scheduled(scheduled: Iterable[ScheduledSeq]) -> None:
    """Stamp the requests a step computes for the first time."""
    now = time.monotonic()
    for item in scheduled:
        if item.seq.request.scheduled_time is None:
            item.seq.request.scheduled_time = now


def mark_token(seq: Sequence, now: float) -> None:
    """Stamp a token sampled for `seq` at `now`: the request's first token time and the sequence's latest."""
    if seq.request.first_token_time is None:
        seq.request.first_token_time = now
    seq.last_token_time = now


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state as its latest step (or added or aborted request) left it: what other threads read
    (metrics, autoscaling, health) instead of reaching into the engine while a step changes it."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up, since start
    prefix_cache_hits: int = 0
    preemptions: int = 0
    has_unfinished_requests: bool = False
