"""Continuous batching: choose which sequences run in the next step and how many tokens each.

Every step has a token budget. Running sequences go first (a decode costs one token, an
unfinished prefill continues with its next chunk); when KV blocks run out the newest running
sequence is preempted and later recomputed. Waiting sequences are then admitted in arrival
order while budget, sequence slots and blocks last; a long prompt is split into chunks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.config import EngineConfig
from serving.engine.block_manager import BlockManager
from serving.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so the step samples a new one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, config: EngineConfig, pipeline_depth: int = 1) -> None:
        self.blocks = blocks
        self.config = config
        # with P pipeline stages, each step takes at most 1/P of the sequences, so that P
        # steps over disjoint sequences can be in flight at once
        self.max_seqs_per_step = max(1, config.max_num_seqs // pipeline_depth)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.pending_copies: list[tuple[int, int]] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_forked(self, seq: Sequence, copy: tuple[int, int] | None) -> None:
        """A sibling that shares its parent's computed prompt joins the running batch directly."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        if copy is not None:
            self.pending_copies.append(copy)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finished or aborted).

        A sequence still in the pipeline keeps its blocks until its step lands (`landed`):
        the step is still writing into them.
        """
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        if not seq.step_pending:
            self.blocks.free(seq)

    def launched(self, output: SchedulerOutput) -> None:
        """The step is on its way: its sequences wait for it, and their KV counts as computed."""
        for item in output.scheduled:
            item.seq.step_pending = True
            item.seq.num_computed_tokens += item.num_new_tokens
            self.blocks.register_computed(item.seq)

    def landed(self, output: SchedulerOutput) -> None:
        """The step's results are back: its sequences can be scheduled (or freed) again."""
        for item in output.scheduled:
            item.seq.step_pending = False
            if item.seq.status is SeqStatus.FINISHED:
                self.blocks.free(item.seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < self.max_seqs_per_step:
            seq = self.running[i]
            if seq.step_pending:  # its previous step is still in the pipeline
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            allocated = self.blocks.allocate_slots(seq, n)
            while not allocated:
                victim = next((s for s in reversed(self.running) if not s.step_pending), None)
                if victim is None:
                    break  # every other sequence has a step pending: wait for one to land
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                allocated = self.blocks.allocate_slots(seq, n)
            if not allocated:
                break
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        waiting_on_prefix: list[Sequence] = []
        while (
            self.waiting
            and budget > 0
            and not preempted
            and len(self.running) < self.config.max_num_seqs
            and len(scheduled) < self.max_seqs_per_step
        ):
            seq = self.waiting.popleft()
            if not seq.block_table and not self.blocks.match_prefix(seq):
                waiting_on_prefix.append(seq)  # its next prompt block is being computed right now
                continue
            n = seq.num_uncomputed_tokens
            if n > budget and (self.config.enable_chunked_prefill or scheduled):
                if not self.config.enable_chunked_prefill:
                    self.waiting.appendleft(seq)
                    break  # the whole prompt waits for a step of its own
                n = budget
            if not self.blocks.allocate_slots(seq, n):
                self.blocks.free(seq)
                seq.num_computed_tokens = 0
                self.waiting.appendleft(seq)
                break
            self.blocks.mark_computing(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(waiting_on_prefix))
        copies, self.pending_copies = self.pending_copies, []
        return SchedulerOutput(scheduled, copies)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it will recompute its prompt and output so far."""
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
