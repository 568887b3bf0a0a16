"""Hugging Face transformers as the reference the engine is checked against, and the rounding of
int4's layer inputs (`int8_inputs`) that its references apply."""

from __future__ import annotations

from pathlib import Path

import torch


def load_reference(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


@torch.inference_mode()
def reference_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] log-softmax of the next-token logits at every position."""
    ids = torch.tensor([token_ids], device=model.device)
    return torch.log_softmax(model(ids).logits[0].float(), dim=-1).cpu()


@torch.inference_mode()
def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    return out[0, len(prompt_ids) :].tolist()


def max_logprob_error(output, reference: torch.Tensor) -> float:
    """Largest difference over every logprob the engine reported (prompt and output, chosen and top-k)."""
    prompt_ids = output.prompt_token_ids
    errors = [0.0]
    for pos, entry in enumerate(output.prompt_logprobs or []):
        if entry is None:
            continue
        chosen, top = entry[0], entry[1]  # prompt entries also carry the rank
        row = reference[pos - 1]
        errors.append(abs(chosen - row[prompt_ids[pos]].item()))
        errors += [abs(v - row[t].item()) for t, v in top.items()]
    completion = output.outputs[0]
    for i, (chosen, top) in enumerate(completion.logprobs or []):
        row = reference[len(prompt_ids) - 1 + i]
        errors.append(abs(chosen - row[completion.token_ids[i]].item()))
        errors += [abs(v - row[t].item()) for t, v in top.items()]
    return max(errors)


def output_summary(output) -> tuple:
    """(token ids, output logprobs, prompt logprobs) of a request's first completion."""
    return output.outputs[0].token_ids, output.outputs[0].logprobs, output.prompt_logprobs


def max_summary_difference(a: list[tuple], b: list[tuple]) -> float:
    """Largest logprob difference between two runs' summaries (chosen tokens and shared top-k)."""
    diffs = [0.0]
    for (_, lp_a, plp_a), (_, lp_b, plp_b) in zip(a, b):
        for x, y in zip(lp_a + [e for e in plp_a if e], lp_b + [e for e in plp_b if e]):
            diffs.append(abs(x[0] - y[0]))
            diffs += [abs(v - y[1][t]) for t, v in x[1].items() if t in y[1]]
    return max(diffs)


def int8_inputs(x: torch.Tensor) -> torch.Tensor:
    """x with each row's groups of 32 rounded to the int8 grid of int4's kernels: dx * round(x * 127 / max|x|),
    dx = max|x| / 127, ties to even."""
    groups = x.reshape(-1, 32)
    largest = groups.abs().amax(dim=1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    return (torch.round(groups * inverse) * (largest / 127)).view(x.shape)
