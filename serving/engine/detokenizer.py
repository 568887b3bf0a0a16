"""Incremental detokenization: turns a stream of generated token ids into text deltas for streaming."""

from __future__ import annotations

from serving.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"  # what decoders put where UTF-8 bytes are incomplete or invalid


class IncrementalDetokenizer:
    """Emits the text each new token adds, decoding only a short window of recent tokens.

    The window holds the tokens already emitted last time (context, so that decoders which strip a
    leading space or merge byte tokens see what they would see in a full decode) followed by the
    tokens not emitted yet. A window whose text ends in U+FFFD is held back until more tokens
    complete the character. The first window starts with a few prompt tokens, so that the first
    output token keeps its leading space with SentencePiece-style decoders.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = _prompt_context(tokenizer, prompt_ids, skip_special_tokens)
        self._read = len(self._ids)  # self._ids[:self._read] have been emitted
        self._read_text = self._decode(self._ids)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it adds, or '' while a character is incomplete."""
        self._ids.append(token_id)
        window_text = self._decode(self._ids)
        if len(window_text) <= len(self._read_text) or window_text.endswith(_REPLACEMENT):
            return ""
        return self._emit(window_text)

    def finish(self) -> str:
        """Return the text still held back, replacement characters and all."""
        window_text = self._decode(self._ids)
        return self._emit(window_text) if len(window_text) > len(self._read_text) else ""

    def _emit(self, window_text: str) -> str:
        delta = window_text[len(self._read_text) :]
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._read_text = self._decode(self._ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def _prompt_context(tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> list[int]:
    """The longest tail of at most _CONTEXT_TOKENS prompt tokens that decodes to whole characters."""
    for n in range(min(_CONTEXT_TOKENS, len(prompt_ids)), 0, -1):
        text = tokenizer.decode(prompt_ids[-n:], skip_special_tokens=skip_special_tokens)
        if not text.startswith(_REPLACEMENT) and not text.endswith(_REPLACEMENT):
            return list(prompt_ids[-n:])
    return []
