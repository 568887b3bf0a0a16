"""The plain data LLM replicas send to API replicas: compact output deltas and model facts.

The engine reports each request's full text and token lists on every step; across a process
boundary only what changed is worth sending, so `DeltaTracker` turns its outputs into deltas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serving.engine.sequence import PromptLogprob, RequestOutput, TokenLogprob
from serving.tokenizer import Tokenizer


@dataclass
class ChoiceDelta:
    """New output of one completion (choice) of a request."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # one entry per token in token_ids, when logprobs were asked for
    finish_reason: str | None = None  # set once, in the delta that ends the choice


@dataclass
class GenerationDelta:
    """What one or more engine steps added to a request."""

    num_prompt_tokens: int
    choices: list[ChoiceDelta] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] | None = None  # in the first delta only, when asked for

    def merge(self, later: GenerationDelta) -> GenerationDelta:
        """This delta followed by `later`, as one delta."""
        by_index = {c.index: ChoiceDelta(c.index, c.text, list(c.token_ids), _copy(c.logprobs), c.finish_reason) for c in self.choices}
        for c in later.choices:
            merged = by_index.setdefault(c.index, ChoiceDelta(c.index, "", [], None if c.logprobs is None else []))
            merged.text += c.text
            merged.token_ids += c.token_ids
            if c.logprobs is not None:
                merged.logprobs = (merged.logprobs or []) + c.logprobs
            merged.finish_reason = c.finish_reason or merged.finish_reason
        prompt_logprobs = self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs
        return GenerationDelta(self.num_prompt_tokens, sorted(by_index.values(), key=lambda c: c.index), prompt_logprobs)


def _copy(logprobs: list[TokenLogprob] | None) -> list[TokenLogprob] | None:
    return None if logprobs is None else list(logprobs)


@dataclass
class ModelInfo:
    """What the API needs to know about the served model; the tokenizer renders and encodes prompts."""

    name: str
    max_model_len: int
    tokenizer: Tokenizer
    tool_parser: str = "none"  # how tool calls are read from the output (serving/server/tools/parsers.py)


class DeltaTracker:
    """One request's state for turning its engine outputs into deltas: which choices have finished (and were
    reported), and whether the prompt logprobs went out already."""

    __slots__ = ("finished", "first")

    def __init__(self) -> None:
        self.finished: set[int] = set()
        self.first = True

    def delta(self, output: RequestOutput) -> GenerationDelta:
        delta = GenerationDelta(len(output.prompt_token_ids), prompt_logprobs=output.prompt_logprobs if self.first else None)
        self.first = False
        for c in output.outputs:
            if c.index in self.finished:
                continue
            if c.finish_reason is not None:
                self.finished.add(c.index)
            elif not c.token_ids_delta and not c.text_delta:
                continue
            new = len(c.token_ids_delta)
            logprobs = None if c.logprobs is None else c.logprobs[len(c.logprobs) - new :] if new else []
            delta.choices.append(ChoiceDelta(c.index, c.text_delta, list(c.token_ids_delta), logprobs, c.finish_reason))
        return delta


def whole_output(output: RequestOutput) -> GenerationDelta:
    """A finished request's whole output as one delta (what all its deltas merged make)."""
    choices = [ChoiceDelta(c.index, c.text, list(c.token_ids), c.logprobs, c.finish_reason) for c in output.outputs]
    choices.sort(key=lambda c: c.index)
    return GenerationDelta(len(output.prompt_token_ids), choices, output.prompt_logprobs)


async def engine_deltas(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[GenerationDelta]:
    """Turn a request's engine outputs into deltas; closing this closes (and so aborts) `outputs`."""
    tracker = DeltaTracker()
    try:
        async for output in outputs:
            yield tracker.delta(output)
    finally:
        await outputs.aclose()


# On the wire (serving/server/channel.py) a delta is plain lists, which msgpack packs without a schema:
# [request_id, finished, num_prompt_tokens, prompt_logprobs, [[index, text, token_ids, logprobs, finish_reason], ...]]
WireEntry = list


def to_wire(request_id: str, finished: bool, delta: GenerationDelta) -> WireEntry:
    choices = [[c.index, c.text, c.token_ids, c.logprobs, c.finish_reason] for c in delta.choices]
    return [request_id, finished, delta.num_prompt_tokens, delta.prompt_logprobs, choices]


def from_wire(entry: WireEntry) -> tuple[str, bool, GenerationDelta]:
    """(request id, whether the request finished, the delta). Logprob entries come back as lists, which index and
    unpack as the engine's tuples do."""
    request_id, finished, num_prompt_tokens, prompt_logprobs, choices = entry
    return request_id, finished, GenerationDelta(num_prompt_tokens, [ChoiceDelta(*c) for c in choices], prompt_logprobs)


def merge_wire(earlier: WireEntry, later: WireEntry) -> WireEntry:
    """Two wire entries of one request as one (a channel that cannot send yet coalesces its pending deltas)."""
    _, _, earlier_delta = from_wire(earlier)
    _, finished, later_delta = from_wire(later)
    return to_wire(earlier[0], finished, earlier_delta.merge(later_delta))
