"""The requests a benchmark sends: random prompts of exact token lengths, a prompt file, or a shared prefix.

Random prompts are made of whole words that are one token each in the served model's tokenizer
(" the", " house", ...), so the text re-tokenizes to exactly the chosen length on the server; every
prompt is checked by encoding it again.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from serving.tokenizer import Tokenizer

_WORD_TOKEN = re.compile(r"^(Ġ|▁)[a-zA-Z]{2,}$")  # byte-level BPE and SentencePiece spellings of " word"


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: the prompt text and how many tokens to ask for."""

    prompt: str | list[int]  # text, or token ids (completions endpoints and in-process engines)
    prompt_len: int  # tokens of `prompt` in the benchmark's tokenizer, without special tokens; 0 if unknown
    output_len: int  # max_tokens; with ignore_eos, exactly what the server generates


class WordSampler:
    """Random runs of one-token words that encode to exactly as many tokens as words."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        ids = range(tokenizer.vocab_size)
        candidates = [i for i, token in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))) if _WORD_TOKEN.match(token)]
        self.words = [w for w in (tokenizer.decode([i]) for i in candidates) if self._count(w) == 1 and w.startswith(" ")]
        if len(self.words) < 100:
            raise ValueError(f"the tokenizer has only {len(self.words)} one-token words; random prompts need a word-level vocabulary")

    def text(self, num_tokens: int) -> str:
        """A text of exactly `num_tokens` tokens; it starts with a space, so texts concatenate token-exactly."""
        for _ in range(20):
            text = "".join(self.rng.choice(self.words) for _ in range(num_tokens))
            if self._count(text) == num_tokens:
                return text
        raise ValueError(f"could not build a prompt of exactly {num_tokens} tokens with this tokenizer")

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def random_requests(tokenizer: Tokenizer, count: int, input_len: int, output_len: int, seed: int = 0) -> list[RequestSpec]:
    """`count` prompts of exactly `input_len` tokens (each starts with a space), asking for `output_len` tokens."""
    words = WordSampler(tokenizer, seed)
    return [RequestSpec(words.text(input_len), input_len, output_len) for _ in range(count)]


def token_id_requests(vocab: range, count: int, input_len: int, output_len: int, seed: int = 0) -> list[RequestSpec]:
    """`count` prompts of `input_len` random token ids from `vocab`: exact lengths with no tokenizer at hand."""
    rng = random.Random(seed)
    return [RequestSpec([rng.choice(vocab) for _ in range(input_len)], input_len, output_len) for _ in range(count)]


def shared_prefix_requests(
    tokenizer: Tokenizer,
    count: int,
    prefix_len: int,
    input_len: int,
    output_len: int,
    num_prefixes: int = 1,
    seed: int = 0,
) -> list[RequestSpec]:
    """Prompts of `prefix_len` shared tokens (one of `num_prefixes` prefixes, in turn) and `input_len` unique ones."""
    words = WordSampler(tokenizer, seed)
    prefixes = [words.text(prefix_len) for _ in range(num_prefixes)]
    specs = []
    for i in range(count):
        prompt = prefixes[i % num_prefixes] + words.text(input_len)
        length = len(tokenizer.encode(prompt, add_special_tokens=False))
        specs.append(RequestSpec(prompt, length, output_len))
    return specs


def file_requests(path: Path, output_len: int, tokenizer: Tokenizer | None = None) -> list[RequestSpec]:
    """Prompts from a JSONL file: one object per line with "prompt" and, optionally, "output_len"."""
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise TypeError(f"{path}:{number}: each line must be a JSON object with a string 'prompt'")
        prompt = record["prompt"]
        length = len(tokenizer.encode(prompt, add_special_tokens=False)) if tokenizer else 0
        specs.append(RequestSpec(prompt, length, int(record.get("output_len", output_len))))
    if not specs:
        raise ValueError(f"{path} holds no prompts")
    return specs
