"""Per-request limits (`server.limits`) checked at the API before a request reaches any LLM replica.

Each check raises `InvalidRequestError` naming the engine's parameter (`prompt`, `max_tokens`,
`logprobs`, `stop`), which the API renames to the endpoint's field and answers with a 400.
"""

from __future__ import annotations

from serving.config import LimitsConfig
from serving.engine.sampling_params import SamplingParams
from serving.errors import InvalidRequestError


def limit_sampling(params: SamplingParams, limits: LimitsConfig, max_tokens_given: bool) -> None:
    """Check the sampling parameters against the limits; a max_tokens the request left out is capped instead.

    `params` is changed in place: its max_tokens becomes at most `limits.max_tokens` when the request
    did not set it (the engine's default may be larger, or unbounded).
    """
    if limits.max_tokens is not None:
        if not max_tokens_given and (params.max_tokens is None or params.max_tokens > limits.max_tokens):
            params.max_tokens = limits.max_tokens
        elif params.max_tokens is not None and params.max_tokens > limits.max_tokens:
            raise InvalidRequestError(f"max_tokens must be at most {limits.max_tokens} on this server", param="max_tokens")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > limits.max_logprobs:
            raise InvalidRequestError(f"{name} must be at most {limits.max_logprobs} on this server", param=name)
    if len(params.stop) > limits.max_stop_sequences:
        raise InvalidRequestError(f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop")
    if any(len(stop) > limits.max_stop_length for stop in params.stop):
        raise InvalidRequestError(f"stop sequences must be at most {limits.max_stop_length} characters long", param="stop")


def limit_prompt(token_ids: list[int], limits: LimitsConfig) -> None:
    if limits.max_prompt_tokens is not None and len(token_ids) > limits.max_prompt_tokens:
        raise InvalidRequestError(
            f"the prompt has {len(token_ids)} tokens; this server takes at most {limits.max_prompt_tokens}", param="prompt"
        )


def limit_messages(count: int, limits: LimitsConfig) -> None:
    if count > limits.max_messages:
        raise InvalidRequestError(f"at most {limits.max_messages} messages are allowed, got {count}", param="prompt")
