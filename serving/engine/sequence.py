"""Requests and their sequences: the engine's unit of work and its per-token state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher

# one entry per token: (logprob of the token, {token id: logprob} of the top candidates, most likely first)
TokenLogprob = tuple[float, dict[int, float]]
# a prompt token's entry also has the token's rank in the vocabulary (1: the most likely token)
PromptLogprob = tuple[float, dict[int, float], int]


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion of a request: the prompt plus the tokens sampled so far."""

    def __init__(self, request: Request, index: int, token_ids: list[int], detokenizer: IncrementalDetokenizer) -> None:
        self.request = request
        self.index = index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = request.num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of the leading full blocks (prefix caching)
        self.prompt_block_hashes: list[bytes] | None = None  # of every full prompt block, computed once
        self.status = SeqStatus.WAITING
        self.step_pending = False  # a launched step computes this sequence and has not been collected (pipelining)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.detokenizer = detokenizer
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.generator: torch.Generator | None = None
        self.matcher: LLMatcher | None = None  # the output constraint's state after the tokens sampled so far
        self.num_emitted_tokens = 0  # output tokens already reported to the caller
        self.num_emitted_chars = 0
        self.last_token_time: float | None = None  # when the latest output token was sampled (metrics)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] = field(default_factory=list)
    first_token_time: float | None = None
    scheduled_time: float | None = None  # first time a step computed any of it (metrics)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    text_delta: str  # text added since the previous output of this request
    token_ids_delta: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PromptLogprob | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float
    first_token_time: float | None
