"""Real requests and engine steps without a model, for the scheduler and block manager tests.

`step` does what `LLMEngine.step` does around the model with a pipeline one step deep: schedule,
launch, land, and append a sampled token to each sequence whose chunk reached its last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers
from tokenizers.models import WordLevel

from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerOutput
from serving.engine.sequence import Request, Sequence
from serving.tokenizer import Tokenizer

VOCAB = 1000
SAMPLED_TOKEN = 999  # what `step` appends: the model is left out, so any token id will do
TOKENIZER = Tokenizer(tokenizers.Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")))


def tokens(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


def new_request(request_id: str, prompt: list[int], **params) -> Sequence:
    """A request and its first sequence, as `LLMEngine.add_request` makes them."""
    request = Request(request_id, None, list(prompt), SamplingParams(**params))
    seq = Sequence(request, 0, request.prompt_token_ids, IncrementalDetokenizer(TOKENIZER, request.prompt_token_ids))
    request.seqs.append(seq)
    return seq


def sibling(parent: Sequence, index: int) -> Sequence:
    """Sequence `index` of the parent's request, forked from it after its prompt (as `LLMEngine._sample` does)."""
    request = parent.request
    seq = Sequence(request, index, parent.token_ids, IncrementalDetokenizer(TOKENIZER, request.prompt_token_ids))
    request.seqs.append(seq)
    return seq


def name(seq: Sequence) -> str:
    return seq.request.request_id if seq.index == 0 else f"{seq.request.request_id}.{seq.index}"


def chunks(output: SchedulerOutput) -> list[tuple[str, int]]:
    """(sequence, tokens computed) for each scheduled sequence, in the step's order."""
    return [(name(item.seq), item.num_new_tokens) for item in output.scheduled]


@dataclass
class Step:
    chunks: list[tuple[str, int]]
    sampled: list[str]  # the sequences whose chunk reached their last token, so that they got a new one
    block_copies: list[tuple[int, int]]


def step(scheduler: Scheduler) -> Step:
    output = scheduler.schedule()
    completing = [item.seq for item in output.scheduled if item.completes]
    scheduler.launched(output)
    scheduler.landed(output)
    for seq in completing:
        seq.token_ids.append(SAMPLED_TOKEN)
    return Step(chunks(output), [name(seq) for seq in completing], output.block_copies)
