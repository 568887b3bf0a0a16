"""Request bodies of the OpenAI-compatible API, validated strictly: wrong types and unknown fields are 400s.

Sampling fields left out (or null) take the engine's defaults (`SamplingParams`), which match OpenAI's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.engine.sampling_params import MAX_LOGPROBS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage of the whole request.")
    continuous_usage_stats: bool = Field(
        False, description="vLLM's: every chunk carries the usage so far (and the last chunk is sent as with include_usage)."
    )


class StructuredOutputs(_Body):
    """vLLM's structured_outputs: exactly one of its fields says what the output must match."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema the output must validate against.")
    regex: str | None = Field(None, description="A regular expression the whole output must match.")
    choice: list[str] | None = Field(None, description="The output is exactly one of these strings.")
    grammar: str | None = Field(None, description="A Lark grammar in llguidance's syntax (the start rule is `start`).")
    json_object: bool | None = Field(None, description="true: the output is any JSON object.")


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
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: what the output must match (docs/structured-output.md)."
    )
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older form of structured_outputs.json.")
    guided_regex: str | None = Field(None, description="vLLM's older form of structured_outputs.regex.")
    guided_choice: list[str] | None = Field(None, description="vLLM's older form of structured_outputs.choice.")
    guided_grammar: str | None = Field(None, description="vLLM's older form of structured_outputs.grammar.")


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


class ToolCallFunction(_Body):
    name: str
    arguments: str = Field(description="The arguments as a JSON object written as text.")


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="Text; may be null only in an assistant message with tool_calls.")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="In an assistant message: the calls it made.")
    tool_call_id: str | None = Field(None, description="In a tool message: the call it answers.")
    refusal: str | None = Field(None, description="In an assistant message; accepted and not used (the openai client sends it back).")

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The function's name: letters, digits, _ and -, at most 64.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object; left out: no arguments.")
    strict: bool | None = Field(None, description="Accepted: when calls are enforced, the schema always is.")


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Body):
    name: str = Field(description="The schema's name; accepted and not used.")
    description: str | None = Field(None, description="Accepted and not used.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the output must validate against.")
    strict: bool | None = Field(None, description="Accepted: the schema is always enforced.")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="'json_object': the output is a JSON object; 'json_schema': it validates against json_schema.schema."
    )
    json_schema: JsonSchemaFormat | None = Field(None, description="With type 'json_schema': the schema.")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    logprobs: bool = Field(False, description="Return the logprob of each generated token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs, also the most likely alternatives at each position."
    )
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(None, description="Functions the model may call (docs/tool-calling.md).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'auto' (the default with tools): the model chooses; 'required' or a named function: calls are enforced."
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call per choice (default true).")
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
