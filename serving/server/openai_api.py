"""OpenAI completions and chat completions over an LLM backend: requests in, JSON bodies or SSE events out.

The API side renders chat templates and tokenizes (so replicas receive token ids), turns request
fields into `SamplingParams`, and shapes the engine's deltas into OpenAI's responses and chunks.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from serving.config import LimitsConfig
from serving.engine.sampling_params import SamplingParams
from serving.errors import LLMClusterError
from serving.server.constraints import request_constraint
from serving.server.formats import ChatFormat, CompletionFormat, Prompt, ResponseFormat, completion_prompts
from serving.server.http_errors import (
    APIError,
    bad_request,
    from_engine_error,
    internal_error,
    model_not_found,
)
from serving.server.limits import limit_messages, limit_prompt, limit_sampling
from serving.server.messages import GenerationDelta, ModelInfo
from serving.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from serving.server.rate_limit import RateLimiter
from serving.server.streams import close_all, gather_or_cancel, merge
from serving.server.tools.request import conversation, plan_tools, request_template
from serving.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# request fields that map one to one onto SamplingParams; None means "the engine's default"
_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop",
    "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
    "include_stop_str_in_output", "skip_special_tokens",
)  # fmt: skip


class LLMBackend(Protocol):
    """The LLM replicas as the API sees them."""

    async def model_info(self) -> ModelInfo: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationDelta]:
        """Stream a request's deltas; closing the iterator aborts the request."""
        ...

    async def complete(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenerationDelta:
        """The whole output of a request as one delta."""
        ...

    async def check_health(self) -> None:
        """Raise unless the engine is alive and making progress."""
        ...


@dataclass
class _Job:
    """One endpoint call, ready to run: prompts, sampling, and how to shape the output."""

    model: str
    prompts: list[Prompt]
    params: SamplingParams
    format: ResponseFormat
    stream: bool
    include_usage: bool  # a last chunk with the request's usage
    continuous_usage: bool  # every chunk with the usage so far
    param_names: Mapping[str, str]  # engine parameter names to this endpoint's names
    api_key: str | None  # the caller's key id when keys are required: rate limits apply to it


class OpenAIServing:
    def __init__(self, backend: LLMBackend, limits: LimitsConfig, rate_limiter: RateLimiter) -> None:
        self.backend = backend
        self.limits = limits
        self.rate_limiter = rate_limiter
        self.created = int(time.time())

    async def models(self) -> dict[str, Any]:
        info = await self.backend.model_info()
        card = {"id": info.name, "object": "model", "created": self.created, "owned_by": "llm-cluster", "max_model_len": info.max_model_len}
        card["tool_parser"] = info.tool_parser
        return {"object": "list", "data": [card]}

    async def completions(self, request: CompletionRequest, api_key: str | None = None) -> dict[str, Any] | AsyncIterator[str]:
        info = await self._model(request.model)
        if request.suffix is not None:
            raise bad_request("suffix is not supported", "suffix")
        # echo with logprobs needs the prompt's logprobs too: the engine computes the larger top-k of the two
        echoed = request.logprobs if request.echo else None
        asked = [k for k in (echoed, request.prompt_logprobs) if k is not None]
        constraint, constraint_field = request_constraint(request, self.limits)
        names = _max_tokens_name(request) | _constraint_name(constraint_field)
        # left out, max_tokens is the engine's default (16, as OpenAI's completions)
        max_tokens = {} if (limit := _max_tokens(request)) is None else {"max_tokens": limit}
        with _engine_errors(names):
            params = self._params(
                request, logprobs=request.logprobs, prompt_logprobs=max(asked) if asked else None, constraint=constraint, **max_tokens
            )
        prompts = completion_prompts(request.prompt)
        if len(prompts) * params.n > self.limits.max_n:
            raise bad_request(f"prompts times n must be at most {self.limits.max_n}", "prompt")
        for prompt in prompts:
            if prompt.text is not None:
                prompt.token_ids = info.tokenizer.encode(prompt.text)
            with _engine_errors({}):
                limit_prompt(prompt.token_ids, self.limits)
        fmt = CompletionFormat(info.tokenizer, request.echo, echoed, request.prompt_logprobs)
        return await self._run(_Job(info.name, prompts, params, fmt, request.stream, *_usage_options(request), names, api_key))

    async def chat(self, request: ChatCompletionRequest, api_key: str | None = None) -> dict[str, Any] | AsyncIterator[str]:
        info = await self._model(request.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        tools = plan_tools(request, info.tool_parser, self.limits)
        constraint, constraint_field = request_constraint(request, self.limits, tools.constraint, tools.forced)
        names = {"prompt": "messages", "logprobs": "top_logprobs"} | _max_tokens_name(request) | _constraint_name(constraint_field)
        with _engine_errors(names):
            limit_messages(len(request.messages), self.limits)
            params = self._params(
                request,
                max_tokens=_max_tokens(request),  # left out: up to the context length (or the server's limit), as OpenAI's chat
                logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                prompt_logprobs=request.prompt_logprobs,
                constraint=constraint,
                **({} if tools.skip_special_tokens is None else {"skip_special_tokens": tools.skip_special_tokens}),
            )
            turns, template = conversation(request.messages), request_template(info.tool_parser, tools.tools, request.messages)
            prompt = Prompt(chat_prompt_ids(info.tokenizer, turns, tools=tools.tools, chat_template=template), None)
            limit_prompt(prompt.token_ids, self.limits)
        fmt = ChatFormat(info.tokenizer, request.prompt_logprobs, tools.calling)
        return await self._run(_Job(info.name, [prompt], params, fmt, request.stream, *_usage_options(request), names, api_key))

    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        """vLLM's /tokenize: the token ids of a prompt, or of messages rendered as /v1/chat/completions renders them."""
        info = await self._optional_model(request.model)
        if isinstance(request, TokenizeCompletionRequest):
            ids = info.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        else:
            with _engine_errors({"prompt": "messages"}):
                limit_messages(len(request.messages), self.limits)
                turns, template = conversation(request.messages), request_template(info.tool_parser, None, request.messages)
                ids = chat_prompt_ids(
                    info.tokenizer, turns, request.add_generation_prompt, request.add_special_tokens, chat_template=template
                )
        strings = info.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids, "token_strs": strings}

    async def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's /detokenize: the text of token ids, special tokens included."""
        info = await self._optional_model(request.model)
        vocab = info.tokenizer.vocab_size
        if not all(0 <= t < vocab for t in request.tokens):
            raise bad_request(f"tokens must be token ids in [0, {vocab})", "tokens")
        return {"prompt": info.tokenizer.decode(request.tokens, skip_special_tokens=False)}

    async def _model(self, name: str) -> ModelInfo:
        info = await self.backend.model_info()
        if name != info.name:
            raise model_not_found(name)
        return info

    async def _optional_model(self, name: str | None) -> ModelInfo:
        """vLLM's tokenizer endpoints let the model be left out; one that is given must be the served one."""
        return await self.backend.model_info() if name is None else await self._model(name)

    def _params(self, request: SamplingRequest, **overrides: Any) -> SamplingParams:
        if request.stream_options is not None and not request.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        if request.stream and request.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not available with stream: true", "prompt_logprobs")
        if request.n is not None and request.n > self.limits.max_n:
            raise bad_request(f"n must be at most {self.limits.max_n}", "n")
        fields = {name: value for name in _SAMPLING_FIELDS if (value := getattr(request, name)) is not None} | overrides
        if request.logit_bias is not None:
            fields["logit_bias"] = _logit_bias(request.logit_bias)
        params = SamplingParams(**fields)
        limit_sampling(params, self.limits, max_tokens_given=fields.get("max_tokens") is not None)
        return params

    async def _run(self, job: _Job) -> dict[str, Any] | AsyncIterator[str]:
        if job.api_key is not None:
            self.rate_limiter.admit(job.api_key, sum(len(p.token_ids) for p in job.prompts))
        request_id = f"{job.format.id_prefix}-{uuid.uuid4().hex}"
        ids = [f"{request_id}-{i}" for i in range(len(job.prompts))]
        if not job.stream:
            with _engine_errors(job.param_names):
                calls = [self.backend.complete(p.token_ids, job.params, rid) for p, rid in zip(job.prompts, ids)]
                results = await gather_or_cancel(calls)
            response = self._response(job, request_id, results)
            self._charge(job, response["usage"]["completion_tokens"])
            return response
        streams = [self.backend.generate(p.token_ids, job.params, rid) for p, rid in zip(job.prompts, ids)]
        try:
            with _engine_errors(job.param_names):
                firsts = [await anext(stream) for stream in streams]  # errors surface before the response starts
        except BaseException:
            await close_all(streams)
            raise
        return self._events(job, request_id, streams, firsts)

    def _response(self, job: _Job, request_id: str, results: list[GenerationDelta]) -> dict[str, Any]:
        fmt, n = job.format, job.params.n
        choices = [fmt.choice(i * n + c.index, job.prompts[i], result, c) for i, result in enumerate(results) for c in result.choices]
        body = {"id": request_id, "object": fmt.object, "created": int(time.time()), "model": job.model, "choices": choices}
        body |= fmt.response_fields(job.prompts, results)
        completion_tokens = sum(len(c.token_ids) for result in results for c in result.choices)
        return body | {"usage": _usage(sum(r.num_prompt_tokens for r in results), completion_tokens)}

    async def _events(
        self, job: _Job, request_id: str, streams: list[AsyncIterator[GenerationDelta]], firsts: list[GenerationDelta]
    ) -> AsyncIterator[str]:
        fmt, n = job.format, job.params.n
        head = {"id": request_id, "object": fmt.chunk_object, "created": int(time.time()), "model": job.model}
        if job.include_usage:
            head["usage"] = None
        prompt_tokens = sum(f.num_prompt_tokens for f in firsts)
        completion_tokens = 0
        # every chunk starts the same: encoded once, each chunk encodes only its choices
        prefix = f'data: {json.dumps(head, ensure_ascii=False)[:-1]}, "choices": '

        def chunk(choices: list[dict[str, Any]]) -> str:
            if job.continuous_usage:
                return _event(head | {"choices": choices, "usage": _usage(prompt_tokens, completion_tokens)})
            return f"{prefix}{json.dumps(choices, ensure_ascii=False)}}}\n\n"

        try:
            for i, first in enumerate(firsts):
                for index in range(n):
                    if (opening := fmt.opening(i * n + index, job.prompts[i], first)) is not None:
                        yield chunk([opening])
            async with aclosing(merge(streams, firsts)) as merged:
                async for i, delta in merged:
                    for c in delta.choices:
                        completion_tokens += len(c.token_ids)
                        yield chunk([fmt.chunk_choice(i * n + c.index, c)])
            if job.include_usage:
                yield _event(head | {"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        except Exception as error:  # the response has started: report the error as the last event
            api_error = _api_error(error, job.param_names)
            if api_error.status >= 500:
                logger.exception("request %s failed mid-stream", request_id)
            yield _event(api_error.body())
        finally:
            self._charge(job, completion_tokens)
            await close_all(streams)

    def _charge(self, job: _Job, generated_tokens: int) -> None:
        if job.api_key is not None:
            self.rate_limiter.record(job.api_key, generated_tokens)


def chat_prompt_ids(
    tokenizer: Tokenizer,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    add_special_tokens: bool | None = None,
    tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """The conversation rendered with the model's chat template (or `chat_template`, with `tools`), encoded. With
    `add_special_tokens` None, as chat completions run it: a template that writes BOS gets no second one."""
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt, tools=tools, chat_template=chat_template)
    if add_special_tokens is None:
        bos = tokenizer.bos_token
        add_special_tokens = not (bos and text.startswith(bos))
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _usage_options(request: SamplingRequest) -> tuple[bool, bool]:
    """(a last chunk with the usage, the usage so far in every chunk); continuous_usage_stats implies the first."""
    options = request.stream_options
    if options is None:
        return False, False
    return options.include_usage or options.continuous_usage_stats, options.continuous_usage_stats


def _max_tokens(request: SamplingRequest) -> int | None:
    return request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens


def _max_tokens_name(request: SamplingRequest) -> dict[str, str]:
    """Errors about max_tokens name the field the request used."""
    return {} if request.max_completion_tokens is None else {"max_tokens": "max_completion_tokens"}


def _constraint_name(field: str | None) -> dict[str, str]:
    """Errors about the output constraint name the field that carried it."""
    return {} if field is None else {"constraint": field}


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as JSON strings."""
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise bad_request("logit_bias keys must be token ids (integers written as strings)", "logit_bias") from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _api_error(error: Exception, param_names: Mapping[str, str]) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, LLMClusterError):
        return from_engine_error(error, param_names)
    return internal_error()


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@contextmanager
def _engine_errors(param_names: Mapping[str, str]) -> Iterator[None]:
    """Engine errors raised inside become API errors, with parameter names as the endpoint spells them."""
    try:
        yield
    except LLMClusterError as error:
        raise from_engine_error(error, param_names) from error
