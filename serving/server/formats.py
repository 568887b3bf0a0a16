"""How completions and chat completions shape their choices, stream chunks and logprobs."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from serving.engine.sequence import TokenLogprob
from serving.server.http_errors import bad_request
from serving.server.messages import ChoiceDelta, GenerationDelta
from serving.tokenizer import Tokenizer


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # None for prompts given as token ids: decoded only when echoed


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """One Prompt per prompt in the request; text prompts are tokenized later, token ids pass as they are."""
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not items:
        raise bad_request("the prompt is empty", "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("the prompt is empty", "prompt")
            prompts.append(Prompt([], item))
        else:
            prompts.append(Prompt(list(item), None))
    return prompts


class ResponseFormat(ABC):
    """The shape one endpoint gives its output; one instance per request (it may track text offsets)."""

    id_prefix: str
    object: str
    chunk_object: str

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def opening(self, index: int, prompt: Prompt, first: GenerationDelta) -> dict[str, Any] | None:
        """The choice of the chunk that opens choice `index` of a stream, if the format has one."""

    @abstractmethod
    def chunk_choice(self, index: int, delta: ChoiceDelta) -> dict[str, Any]:
        """The choice of a stream chunk carrying `delta`."""

    @abstractmethod
    def choice(self, index: int, prompt: Prompt, result: GenerationDelta, output: ChoiceDelta) -> dict[str, Any]:
        """A whole choice of a non-streaming response; `result` holds the request's prompt logprobs."""

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class CompletionFormat(ResponseFormat):
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, tokenizer: Tokenizer, echo: bool) -> None:
        super().__init__(tokenizer)
        self.echo = echo
        self.offsets: dict[int, int] = {}  # choice index -> characters covered by logprobs so far

    def opening(self, index: int, prompt: Prompt, first: GenerationDelta) -> dict[str, Any] | None:
        if not self.echo:
            return None
        logprobs = None if first.prompt_logprobs is None else self._logprobs(index, prompt.token_ids, first.prompt_logprobs)
        return {"index": index, "text": self._prompt_text(prompt), "logprobs": logprobs, "finish_reason": None}

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> dict[str, Any]:
        logprobs = None if delta.logprobs is None else self._logprobs(index, delta.token_ids, delta.logprobs)
        return {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    def choice(self, index: int, prompt: Prompt, result: GenerationDelta, output: ChoiceDelta) -> dict[str, Any]:
        parts = []
        if self.echo and result.prompt_logprobs is not None:
            parts.append(self._logprobs(index, prompt.token_ids, result.prompt_logprobs))
        if output.logprobs is not None:
            parts.append(self._logprobs(index, output.token_ids, output.logprobs))
        logprobs = {key: [v for part in parts for v in part[key]] for key in parts[0]} if parts else None
        text = (self._prompt_text(prompt) if self.echo else "") + output.text
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": output.finish_reason}

    def _prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    def _logprobs(self, index: int, token_ids: list[int], entries: list[TokenLogprob | None]) -> dict[str, list[Any]]:
        """OpenAI's legacy layout; an entry is None for the first prompt token, which nothing predicts."""
        tokens = [self.token(t) for t in token_ids]
        offsets, offset = [], self.offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self.offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else {self.token(t): lp for t, lp in e[1].items()} for e in entries],
            "text_offset": offsets,
        }


class ChatFormat(ResponseFormat):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def opening(self, index: int, prompt: Prompt, first: GenerationDelta) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> dict[str, Any]:
        content = {"content": delta.text} if delta.text else {}
        return {"index": index, "delta": content, "logprobs": self._logprobs(delta), "finish_reason": delta.finish_reason}

    def choice(self, index: int, prompt: Prompt, result: GenerationDelta, output: ChoiceDelta) -> dict[str, Any]:
        message = {"role": "assistant", "content": output.text}
        return {"index": index, "message": message, "logprobs": self._logprobs(output), "finish_reason": output.finish_reason}

    def _logprobs(self, delta: ChoiceDelta) -> dict[str, Any] | None:
        if delta.logprobs is None:
            return None
        content = []
        for token_id, (logprob, top) in zip(delta.token_ids, delta.logprobs):
            entry = self._entry(token_id, logprob)
            content.append(entry | {"top_logprobs": [self._entry(t, lp) for t, lp in top.items()]})
        return {"content": content}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self.token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
