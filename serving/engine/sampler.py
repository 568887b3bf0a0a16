"""Turn one row of logits per sequence into the next token, with per-request sampling settings.

Random choices use the exponential race (argmax of p / E with E ~ Exp(1)), which samples from p
exactly and lets each seeded sequence draw its noise from its own generator: a seeded request
gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence, TokenLogprob


def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int] = frozenset()
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample one token for each row of `logits` [N, V]; row i belongs to seqs[i].

    Logprobs are those of the distribution the rows hold (the model's, after the engine masked the tokens
    an output constraint forbids), before penalties, logit_bias and min_tokens;
    `eos_token_ids` are masked (with each request's stop_token_ids) while a request is short of min_tokens.
    """
    params = [seq.request.params for seq in seqs]
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    if any(p.adjusts_logits for p in params):
        logits = _adjust_logits(logits.clone(), seqs, eos_token_ids)
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        tokens = greedy_tokens
    else:
        tokens = torch.where(
            torch.tensor([p.greedy for p in params], device=logits.device),
            greedy_tokens,
            _sample_random(logits, seqs),
        )
    token_list = tokens.tolist()
    logprobs = [top_logprobs(raw_logprobs[i], token_list[i], p.logprobs) if p.logprobs is not None else None for i, p in enumerate(params)]
    return token_list, logprobs


def top_logprobs(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """(logprob of token_id, the k most likely tokens with their logprobs) from one log-softmax row."""
    top = {}
    if k > 0:
        values, ids = logprobs.topk(k)
        top = dict(zip(ids.tolist(), values.tolist()))
    return float(logprobs[token_id]), top


def _adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> torch.Tensor:
    """Penalties row by row, then every logit_bias entry of the batch in one scatter-add and every
    min_tokens mask in one scatter: the rows of requests without these features are left alone."""
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    mask_rows: list[int] = []
    mask_ids: list[int] = []
    for i, seq in enumerate(seqs):
        params = seq.request.params
        if params.has_penalties:
            _apply_penalties(logits[i], seq)
        if params.logit_bias:
            bias_rows += [i] * len(params.logit_bias)
            bias_ids += params.logit_bias.keys()
            bias_values += params.logit_bias.values()
        if params.min_tokens and len(seq.token_ids) - seq.num_prompt_tokens < params.min_tokens:
            stops = params.stop_token_ids if params.ignore_eos else [*params.stop_token_ids, *eos_token_ids]
            mask_rows += [i] * len(stops)
            mask_ids += stops
    if bias_rows:
        index = (_long(bias_rows, logits.device), _long(bias_ids, logits.device))
        logits.index_put_(index, torch.tensor(bias_values, dtype=logits.dtype, device=logits.device), accumulate=True)
    if mask_rows:
        logits[_long(mask_rows, logits.device), _long(mask_ids, logits.device)] = float("-inf")
    return logits


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """Repetition penalty over prompt and output (as HF); presence/frequency over output (as OpenAI)."""
    params = seq.request.params
    if params.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    output = seq.output_token_ids
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, device=row.device), minlength=row.shape[0]).to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)


def _sample_random(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    params = [seq.request.params for seq in seqs]
    temperatures = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
    logits = logits / temperatures[:, None]
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        logits = _top_k_top_p(logits, params)
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    noise = torch.empty_like(probs).exponential_()
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            noise[i].exponential_(generator=seq.generator)
    return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, params) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
    drop = ranks >= top_k[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
