"""How completions and chat completions shape their choices, stream chunks and logprobs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from serving.engine.sequence import PromptLogprob, TokenLogprob
from serving.server.http_errors import bad_request
from serving.server.messages import ChoiceDelta, GenerationDelta
from serving.server.tools.stream import ToolCalling, ToolStream
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

    def __init__(self, tokenizer: Tokenizer, prompt_logprobs: int | None = None) -> None:
        """`prompt_logprobs`: the top-k of vLLM's prompt_logprobs field, when the request asked for it."""
        self.tokenizer = tokenizer
        self.prompt_logprobs = prompt_logprobs

    @abstractmethod
    def opening(self, index: int, prompt: Prompt, first: GenerationDelta) -> dict[str, Any] | None:
        """The choice of the chunk that opens choice `index` of a stream, if the format has one."""

    @abstractmethod
    def chunk_choice(self, index: int, delta: ChoiceDelta) -> dict[str, Any]:
        """The choice of a stream chunk carrying `delta`."""

    @abstractmethod
    def choice(self, index: int, prompt: Prompt, result: GenerationDelta, output: ChoiceDelta) -> dict[str, Any]:
        """A whole choice of a non-streaming response; `result` holds the request's prompt logprobs."""

    def response_fields(self, prompts: list[Prompt], results: list[GenerationDelta]) -> dict[str, Any]:
        """Fields of a non-streaming response beside its choices."""
        return {}

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def vllm_prompt_logprobs(self, prompt: Prompt, entries: list[PromptLogprob | None]) -> list[dict[int, dict[str, Any]] | None]:
        """vLLM's layout: per prompt token, None for the first, else {token id: {logprob, rank, decoded_token}}
        holding the prompt token and the top prompt_logprobs candidates."""
        k = self.prompt_logprobs or 0
        out: list[dict[int, dict[str, Any]] | None] = []
        for token_id, entry in zip(prompt.token_ids, entries):
            if entry is None:
                out.append(None)
                continue
            logprob, top, rank = entry
            candidates = {token_id: self._vllm_entry(token_id, logprob, rank)}
            for r, (t, lp) in enumerate(list(top.items())[:k], start=1):
                candidates.setdefault(t, self._vllm_entry(t, lp, r))
            out.append(candidates)
        return out

    def _vllm_entry(self, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": self.token(token_id)}


class CompletionFormat(ResponseFormat):
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, tokenizer: Tokenizer, echo: bool, echo_logprobs: int | None, prompt_logprobs: int | None) -> None:
        """`echo_logprobs`: the top-k of the echoed prompt's legacy logprobs (the request's logprobs, with echo)."""
        super().__init__(tokenizer, prompt_logprobs)
        self.echo = echo
        self.echo_logprobs = echo_logprobs
        self.offsets: dict[int, int] = {}  # choice index -> characters covered by logprobs so far

    def opening(self, index: int, prompt: Prompt, first: GenerationDelta) -> dict[str, Any] | None:
        if not self.echo:
            return None
        logprobs = None if self.echo_logprobs is None else self._echo_logprobs(index, prompt, first)
        return {"index": index, "text": self._prompt_text(prompt), "logprobs": logprobs, "finish_reason": None}

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> dict[str, Any]:
        logprobs = None if delta.logprobs is None else self._logprobs(index, delta.token_ids, delta.logprobs)
        return {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    def choice(self, index: int, prompt: Prompt, result: GenerationDelta, output: ChoiceDelta) -> dict[str, Any]:
        parts = []
        if self.echo and self.echo_logprobs is not None:
            parts.append(self._echo_logprobs(index, prompt, result))
        if output.logprobs is not None:
            parts.append(self._logprobs(index, output.token_ids, output.logprobs))
        logprobs = {key: [v for part in parts for v in part[key]] for key in parts[0]} if parts else None
        text = (self._prompt_text(prompt) if self.echo else "") + output.text
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": output.finish_reason}
        if self.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.vllm_prompt_logprobs(prompt, result.prompt_logprobs or [])
        return choice

    def _echo_logprobs(self, index: int, prompt: Prompt, result: GenerationDelta) -> dict[str, list[Any]]:
        """The prompt's legacy logprobs, with the echo's top-k (the engine may have computed more for prompt_logprobs)."""
        k = self.echo_logprobs or 0
        entries = [None if e is None else (e[0], dict(list(e[1].items())[:k])) for e in result.prompt_logprobs or []]
        return self._logprobs(index, prompt.token_ids, entries)

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

    def __init__(self, tokenizer: Tokenizer, prompt_logprobs: int | None = None, tools: ToolCalling | None = None) -> None:
        """`tools`: how tool calls are read from the output, when the request offered tools."""
        super().__init__(tokenizer, prompt_logprobs)
        self.tools = tools
        self.tool_streams: dict[int, ToolStream] = {}  # choice index -> its tool calls so far

    def response_fields(self, prompts: list[Prompt], results: list[GenerationDelta]) -> dict[str, Any]:
        """vLLM puts a chat request's prompt logprobs beside its choices: the choices share one prompt."""
        if self.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": self.vllm_prompt_logprobs(prompts[0], results[0].prompt_logprobs or [])}

    def opening(self, index: int, prompt: Prompt, first: GenerationDelta) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> dict[str, Any]:
        content, finish_reason = {"content": delta.text} if delta.text else {}, delta.finish_reason
        if self.tools is not None:
            if (stream := self.tool_streams.get(index)) is None:
                stream = self.tool_streams[index] = self.tools.stream()
            content, finish_reason = stream.feed(delta.text, delta.finish_reason)
        return {"index": index, "delta": content, "logprobs": self._logprobs(delta), "finish_reason": finish_reason}

    def choice(self, index: int, prompt: Prompt, result: GenerationDelta, output: ChoiceDelta) -> dict[str, Any]:
        message, finish_reason = {"role": "assistant", "content": output.text}, output.finish_reason
        if self.tools is not None:
            message, finish_reason = self.tools.message(output.text, output.finish_reason)
        return {"index": index, "message": message, "logprobs": self._logprobs(output), "finish_reason": finish_reason}

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
