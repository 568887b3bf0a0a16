"""The synchronous engine: accepts requests, runs scheduler + model steps, reports outputs."""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import torch
from llguidance import LLMatcher

from serving.config import LLMConfig
from serving.engine.block_manager import BlockManager
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.make_runner import make_runner
from serving.engine.runner import SeqChunk, StepInput
from serving.engine.sampler import sample, top_logprobs
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from serving.engine.sequence import CompletionOutput, Request, RequestOutput, Sequence
from serving.engine.stats import EngineStepStats, mark_scheduled, mark_token
from serving.engine.structured import GrammarCompiler, MaskFiller, StepMasks, apply_masks
from serving.errors import ContextLengthError, InvalidRequestError
from serving.models.arch import ModelArch, model_limits
from serving.models.source import resolve_model
from serving.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Scheduler, KV block bookkeeping and sampling around a model runner (serving/engine/runner.py)."""

    def __init__(self, config: LLMConfig, collect_stats: bool = False) -> None:
        """`collect_stats`: keep measurements for `take_stats` (only for an owner that takes them regularly)."""
        self.config = config
        self.model_dir: Path = resolve_model(config.model.source)
        if config.parallel.backend == "native":  # refuses an architecture the native model does not implement
            arch = ModelArch.from_folder(self.model_dir)
            self.vocab_size, context_limit = arch.vocab_size, arch.max_position_embeddings
        else:  # any Hugging Face causal LM
            self.vocab_size, context_limit = model_limits(self.model_dir)
        self.max_model_len = self._max_model_len(context_limit)
        self.model_name = config.model.served_name or self.model_dir.name
        self.tokenizer = Tokenizer.from_folder(self.model_dir)
        load_started = time.monotonic()
        self.runner = make_runner(config, self.model_dir, self.max_model_len)
        self.model_load_s = time.monotonic() - load_started
        self.blocks = BlockManager(self.runner.num_blocks, config.engine.block_size, config.engine.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.engine, config.parallel.pipeline_parallel)
        self.requests: dict[str, Request] = {}
        self.pipeline_depth = config.parallel.pipeline_parallel
        # steps submitted to the runner and not yet collected, oldest first
        self.launched_steps: deque[tuple[SchedulerOutput, list[SeqChunk], object, StepMasks | None]] = deque()
        self.grammars = GrammarCompiler(self.model_dir / "tokenizer.json", self.vocab_size, self.tokenizer.eos_token_ids)
        self.masks = MaskFiller(self.vocab_size)
        self.constrained: set[Sequence] = set()  # unfinished sequences with an output constraint
        self.stats: EngineStepStats | None = EngineStepStats() if collect_stats else None

    def _max_model_len(self, limit: int) -> int:
        asked = self.config.model.max_model_len
        if asked is not None and asked > limit:
            raise ValueError(f"max_model_len {asked} exceeds the model's context length {limit}")
        return asked or limit

    # requests in

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, matcher: LLMatcher | None = None) -> None:
        """Queue a request; raises InvalidRequestError (or ContextLengthError) if it cannot run.

        A request with an output constraint takes `matcher` from `compile_constraint`, which callers
        that step the engine from another thread run before, outside the step lock; left out, it is compiled here.
        """
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        prompt_ids = self._prompt_ids(prompt)
        self._check_length(len(prompt_ids), params)
        self._check_token_ids(params)
        if params.constraint is not None and matcher is None:
            matcher = self.compile_constraint(params)
        request = Request(request_id, prompt if isinstance(prompt, str) else None, prompt_ids, params)
        seq = self._new_sequence(request, 0, prompt_ids)
        if matcher is not None:
            seq.matcher = matcher
            self.constrained.add(seq)
        request.seqs.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def compile_constraint(self, params: SamplingParams) -> LLMatcher | None:
        """A fresh matcher for the request's output constraint (None without one); safe from any thread.
        Compiled grammars are cached by content; raises InvalidRequestError if the constraint does not compile."""
        return None if params.constraint is None else self.grammars.matcher(params.constraint)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def _check_token_ids(self, params: SamplingParams) -> None:
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            if any(t >= self.vocab_size for t in ids):
                raise InvalidRequestError(f"{name} must hold token ids in [0, {self.vocab_size})", param=name)

    def _check_length(self, num_prompt: int, params: SamplingParams) -> None:
        limit = self.max_model_len
        wanted = num_prompt + (params.max_tokens or 1)
        if wanted > limit:
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens, but {wanted} were requested "
                f"({num_prompt} in the prompt, {params.max_tokens or 1} for the completion)",
                param="max_tokens" if num_prompt < limit else "prompt",
            )

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        seq = Sequence(request, index, token_ids, detok)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (None if unknown)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                self._drop_matcher(seq)
        if self.stats is not None:
            self.stats.record_finished(request)
        return self._output(request)

    # the step

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Launch steps until the pipeline is full, then land the oldest; returns its outputs.

        A single worker (or tensor parallelism alone) has a pipeline one step deep. With P
        pipeline stages up to P steps are launched and not yet collected, over disjoint sets of sequences.
        """
        while len(self.launched_steps) < self.pipeline_depth:
            scheduled = self.scheduler.schedule()
            if not scheduled.scheduled:
                break
            chunks = [self._chunk(item) for item in scheduled.scheduled]
            handle = self.runner.submit(StepInput(chunks, scheduled.block_copies))
            # while the model runs (on CUDA, or in workers), the constrained sequences' next-token masks
            masks = self._fill_masks(scheduled, chunks) if self.constrained else None
            self.scheduler.launched(scheduled)
            mark_scheduled(scheduled.scheduled)
            self.launched_steps.append((scheduled, chunks, handle, masks))
        if not self.launched_steps:
            return []
        scheduled, chunks, handle, masks = self.launched_steps.popleft()
        logits = self.runner.collect(handle)
        self.scheduler.landed(scheduled)
        for i, rows in logits.prompt_logits.items():
            self._record_prompt_logprobs(scheduled.scheduled[i].seq, chunks[i].start, rows)
        sampled = [item.seq for item, chunk in zip(scheduled.scheduled, chunks) if chunk.sample]
        keep = [k for k, seq in enumerate(sampled) if not seq.is_finished]  # not aborted while its step ran
        sampling, sample_logits = [sampled[k] for k in keep], take_rows(logits.sample_logits, keep)
        touched: dict[str, Request] = {}
        for seq, token, logprob in self._sample(sampling, sample_logits, masks):
            self._append_token(seq, token, logprob)
            touched[seq.request.request_id] = seq.request
        outputs = []
        for request in touched.values():
            outputs.append(self._output(request))
            if request.is_finished:
                del self.requests[request.request_id]
                if self.stats is not None:
                    self.stats.record_finished(request)
        return outputs

    @staticmethod
    def _chunk(item: ScheduledSeq) -> SeqChunk:
        seq, start = item.seq, item.seq.num_computed_tokens
        wants_prompt_logits = seq.request.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1
        return SeqChunk(
            seq.token_ids[start : start + item.num_new_tokens], start, list(seq.block_table), item.completes, wants_prompt_logits
        )

    def _fill_masks(self, scheduled: SchedulerOutput, chunks: list[SeqChunk]) -> StepMasks | None:
        return self.masks.fill([item.seq for item, chunk in zip(scheduled.scheduled, chunks) if chunk.sample])

    def _sample(self, sampling: list[Sequence], sample_logits: torch.Tensor, masks: StepMasks | None):
        """Sample each completing sequence; a parent finishing its prompt also samples its n-1 siblings.

        `masks` restricts constrained sequences to the tokens their grammar allows; a sibling, forked
        before any output, starts from its parent's matcher state and so takes its parent's mask row.
        """
        rows, seqs = [], []
        for row, seq in enumerate(sampling):
            rows.append(row)
            seqs.append(seq)
            request = seq.request
            if seq.index == 0 and len(request.seqs) < request.params.n:
                for index in range(1, request.params.n):
                    sibling = self._new_sequence(request, index, seq.token_ids)
                    if seq.matcher is not None:
                        sibling.matcher = seq.matcher.deep_copy()
                        self.constrained.add(sibling)
                    self.scheduler.add_forked(sibling, self.blocks.fork(seq, sibling))
                    request.seqs.append(sibling)
                    rows.append(row)
                    seqs.append(sibling)
        if not seqs:
            return []
        logits = take_rows(sample_logits, rows)
        if masks is not None:
            masked = [(i, masks.rows[sampling[row]]) for i, row in enumerate(rows) if sampling[row] in masks.rows]
            if masked:
                targets, sources = zip(*masked)
                apply_masks(logits, list(targets), take_rows(masks.bitmask, list(sources)))
        tokens, logprobs = sample(logits, seqs, self.tokenizer.eos_token_ids)
        return zip(seqs, tokens, logprobs)

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, start: int, rows: torch.Tensor) -> None:
        """Row i holds the logits after position start + i, i.e. the prediction of token start + i + 1."""
        request = seq.request
        if not request.prompt_logprobs:
            request.prompt_logprobs.append(None)  # nothing predicts the first token
        first = len(request.prompt_logprobs) - start - 1  # rows before it predict tokens already recorded
        targets = request.prompt_token_ids[start + 1 + first : start + 1 + rows.shape[0]]
        if first < 0 or not targets:
            return
        log_probs = torch.log_softmax(rows[first : first + len(targets)], dim=-1)
        chosen = log_probs.gather(1, torch.tensor(targets, device=log_probs.device)[:, None])
        ranks = ((log_probs > chosen).sum(dim=-1) + 1).tolist()  # 1 for the most likely token
        k = request.params.prompt_logprobs
        for i, (target, rank) in enumerate(zip(targets, ranks)):
            request.prompt_logprobs.append((*top_logprobs(log_probs[i], target, k), rank))

    def _append_token(self, seq: Sequence, token: int, logprob) -> None:
        params, now = seq.request.params, time.monotonic()
        if self.stats is not None:
            self.stats.record_token(seq, now)
        mark_token(seq, now)
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            return self._finish(seq, "stop")
        if token in params.stop_token_ids:
            if params.include_stop_str_in_output:
                seq.text += seq.detokenizer.add(token)
            return self._finish(seq, "stop", token)
        seq.text += seq.detokenizer.add(token)
        if params.stop and len(seq.token_ids) - seq.num_prompt_tokens > params.min_tokens and self._hit_stop_string(seq, params):
            return
        if seq.matcher is not None and not self._advance_matcher(seq, token):
            return self._finish(seq, "stop")
        if len(seq.output_token_ids) >= (params.max_tokens or self.max_model_len) or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length")

    @staticmethod
    def _advance_matcher(seq: Sequence, token: int) -> bool:
        """Feed the sampled token to the sequence's grammar; False once the grammar allows nothing more."""
        if not seq.matcher.consume_token(token):  # the mask allowed it, so only a fault in the matcher gets here
            logger.warning("request %s: the grammar refused token %d: %s", seq.request.request_id, token, seq.matcher.get_error())
            return False
        return not seq.matcher.is_stopped()

    def _hit_stop_string(self, seq: Sequence, params: SamplingParams) -> bool:
        window_start = max(0, len(seq.text) - max(len(s) for s in params.stop) - 16)
        hits = [(seq.text.find(s, window_start), s) for s in params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        seq.text = seq.text[: pos + len(stop) if params.include_stop_str_in_output else pos]
        self._finish(seq, "stop", stop)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if reason != "stop" or stop_reason is None or isinstance(stop_reason, int):
            seq.text += seq.detokenizer.finish()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        self._drop_matcher(seq)

    def _drop_matcher(self, seq: Sequence) -> None:
        if seq.matcher is not None:
            seq.matcher = None
            self.constrained.discard(seq)

    def _output(self, request: Request) -> RequestOutput:
        holdback = max((len(s) for s in request.params.stop), default=1) - 1
        completions = []
        for seq in request.seqs:
            visible = len(seq.text) if seq.is_finished else max(seq.num_emitted_chars, len(seq.text) - holdback)
            outputs = seq.output_token_ids
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text[:visible],
                    token_ids=list(outputs),
                    text_delta=seq.text[seq.num_emitted_chars : visible],
                    token_ids_delta=outputs[seq.num_emitted_tokens :],
                    logprobs=list(seq.logprobs) if request.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            seq.num_emitted_chars, seq.num_emitted_tokens = visible, len(outputs)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=request.prompt_logprobs if request.params.prompt_logprobs is not None else None,
            outputs=completions,
            finished=request.is_finished,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
        )

    # state for metrics and health

    def take_stats(self) -> EngineStepStats:
        """What the steps since the previous call measured (nothing without `collect_stats`); starts a new collection."""
        if self.stats is None:
            return EngineStepStats()
        stats, self.stats = self.stats, EngineStepStats()
        return stats

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)


def take_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows] without a copy in the usual case of every row once, and with index_select otherwise:
    indexing with a list copies element by element (9 ms for 32 x 49k float32 logits on CPU)."""
    if rows == list(range(logits.shape[0])):
        return logits
    return logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))
