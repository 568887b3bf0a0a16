"""Request bodies of the OpenAI-compatible API, validated strictly: wrong types and unknown fields are 400s.

Sampling fields left out (or null) take the engine's defaults (`SamplingParams`), which match OpenAI's.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.engine.sampling_params import MAX_LOGPROBS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage of the whole request.")
    continuous_usage_stats: bool = Field(
        False, description="vLLM's: every chunk carries the usage so far (and the last chunk is sent as with include_usage)."
    )


class SamplingRequest(_Body):
    """The fields completions and chat completions share."""

    model: str = Field(description="The served model's name, as listed by GET /v1/models.")
    n: int | None = Field(None, description="Completions to generate for each prompt.")
    max_tokens: int | None = Field(None, description="Most tokens to generate per completion.")
    max_completion_tokens: int | None = Field(None, description="Most tokens to generate; overrides max_tokens.")
    temperature: float | None = Field(None, description="Sampling temperature; 0 is greedy.")
    top_p: float | None = Field(None, description="Nucleus sampling: keep the smallest top set with this much probability.")
    presence_penalty: float | None = Field(None, description="In [-2, 2]: penalise tokens already generated.")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]: penalise tokens by how often they were generated.")
    seed: int | None = Field(None, description="Makes sampling reproducible; choice i uses seed + i.")
    stop: str | list[str] | None = Field(None, description="Strings that end a completion (not included in it).")
    stream: bool = Field(False, description="Stream server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="An end-user id; accepted and ignored.")
    top_k: int | None = Field(None, description="Beyond OpenAI: sample from the k most likely tokens (0: all).")
    min_p: float | None = Field(None, description="Beyond OpenAI: drop tokens less likely than min_p times the top one.")
    repetition_penalty: float | None = Field(None, description="Beyond OpenAI: Hugging Face-style repetition penalty.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> value in [-100, 100] added to its logit before sampling."
    )
    ignore_eos: bool | None = Field(None, description="Beyond OpenAI: keep generating past end-of-sequence tokens.")
    min_tokens: int | None = Field(None, description="vLLM's: no end-of-sequence, stop token or stop string before this many tokens.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM's: token ids that end a completion (the token is kept).")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM's: keep the stop string that ended a completion.")
    skip_special_tokens: bool | None = Field(None, description="vLLM's: leave special tokens out of the text (default true).")
    spaces_between_special_tokens: bool | None = Field(
        None, description="vLLM's; accepted and without effect: decoding never adds spaces around special tokens (see docs/api.md)."
    )
    prompt_logprobs: int | None = Field(
        None, description=f"vLLM's: logprob of each prompt token and its top [0, {MAX_LOGPROBS}] alternatives (not with stream)."
    )


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, token ids, or a list of token id lists."
    )
    echo: bool = Field(False, description="Put the prompt in front of the completion (and its logprobs).")
    logprobs: int | None = Field(None, description=f"Also return the top [0, {MAX_LOGPROBS}] logprobs of each token.")
    suffix: str | None = Field(None, description="Not supported: any value is rejected.")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(_Body):
    type: Literal["text"] = Field(description="Only plain text is supported.")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    logprobs: bool = Field(False, description="Return the logprob of each generated token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs, also the most likely alternatives at each position."
    )
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored: tool calling is not supported yet.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored: nothing is stored.")
    store: bool | None = Field(None, description="Accepted and ignored: nothing is stored.")
    service_tier: str | None = Field(None, description="Accepted and ignored: there is one tier.")


class TokenizeCompletionRequest(_Body):
    """vLLM's POST /tokenize with a prompt."""

    model: str | None = Field(None, description="The served model's name; may be left out.")
    prompt: str
    add_special_tokens: bool = Field(True, description="Add the tokens the tokenizer adds to a prompt (e.g. BOS).")
    return_token_strs: bool = Field(False, description="Also return each token's string.")


class TokenizeChatRequest(_Body):
    """vLLM's POST /tokenize with messages, rendered with the chat template."""

    model: str | None = Field(None, description="The served model's name; may be left out.")
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="End with the template's opening of an assistant turn.")
    add_special_tokens: bool | None = Field(
        None, description="Left out: the tokens /v1/chat/completions would run (BOS unless the template writes it)."
    )
    return_token_strs: bool = Field(False, description="Also return each token's string.")


class DetokenizeRequest(_Body):
    """vLLM's POST /detokenize."""

    model: str | None = Field(None, description="The served model's name; may be left out.")
    tokens: list[int]
