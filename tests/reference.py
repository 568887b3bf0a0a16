"""Hugging Face transformers as the reference the engine is checked against."""
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
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt_ids) :].tolist()


def max_logprob_error(output, reference: torch.Tensor) -> float:
    """Largest difference over every logprob the engine reported (prompt and output, chosen and top-k)."""
    prompt_ids = output.prompt_token_ids
    errors = [0.0]
    for pos, entry in enumerate(output.prompt_logprobs or []):
        if entry is None:
            continue
        chosen, top = entry
        row = reference[pos - 1]
        errors.append(abs(chosen - row[prompt_ids[pos]].item()))
        errors += [abs(v - row[t].item()) for t, v in top.items()]
    completion = output.outputs[0]
    for i, (chosen, top) in enumerate(completion.logprobs or []):
        row = reference[len(prompt_ids) - 1 + i]
        errors.append(abs(chosen - row[completion.token_ids[i]].item()))
        errors += [abs(v - row[t].item()) for t, v in top.items()]
    return max(errors)
