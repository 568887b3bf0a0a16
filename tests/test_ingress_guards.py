"""The API's guards without a server: API keys, per-key token buckets (on a hand-driven clock) and the
request limits. The served versions are in test_ingress_serve.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.config import AuthConfig, LimitsConfig, ServerConfig
from serving.engine.sampling_params import SamplingParams
from serving.errors import InvalidRequestError, LLMClusterError
from serving.server.auth import KEYS_ENV, APIKeys
from serving.server.http_errors import APIError
from serving.server.limits import limit_messages, limit_prompt, limit_sampling
from serving.server.rate_limit import RateLimiter

# API keys


def test_keys_come_from_the_environment_and_the_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team a\nkey-from-file\n\n  spaced-key  \n")
    keys = APIKeys.load(AuthConfig(require_api_key=True, api_keys_file=str(path)), {KEYS_ENV: "env-1, env-2,,"})
    assert len(keys) == 4
    ids = {key: keys.identify(key) for key in ("env-1", "env-2", "key-from-file", "spaced-key")}
    assert None not in ids.values() and len(set(ids.values())) == 4
    for wrong in ("env-3", "env-1 ", "key-from-fil", "", "# team a"):
        assert keys.identify(wrong) is None


def test_a_key_id_does_not_reveal_the_key():
    keys = APIKeys(["sk-secret-value"])
    key_id = keys.identify("sk-secret-value")
    assert key_id is not None and "secret" not in key_id and len(key_id) == 12


def test_required_keys_without_any_refuse_to_start():
    with pytest.raises(LLMClusterError, match=KEYS_ENV):
        APIKeys.load(AuthConfig(require_api_key=True), {})
    assert len(APIKeys.load(AuthConfig(), {})) == 0  # keys off: nothing needed


def test_rate_limits_need_api_keys():
    with pytest.raises(ValidationError, match="require_api_key"):
        ServerConfig.model_validate({"auth": {"requests_per_minute": 10}})


# rate limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(limiter: RateLimiter, key: str, prompt_tokens: int = 0) -> APIError | None:
    try:
        limiter.admit(key, prompt_tokens)
    except APIError as error:
        return error
    return None


def test_requests_per_minute_burst_then_refill():
    clock = Clock()
    limiter = RateLimiter(AuthConfig(require_api_key=True, requests_per_minute=6), clock)  # one every 10 s
    assert [refused(limiter, "a") for _ in range(6)] == [None] * 6
    error = refused(limiter, "a")
    assert error is not None and error.status == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert error.headers["Retry-After"] == "10"
    assert refused(limiter, "b") is None  # every key has its own buckets
    clock.now += 4
    assert refused(limiter, "a").headers["Retry-After"] == "6"
    clock.now += 6
    assert refused(limiter, "a") is None and refused(limiter, "a") is not None
    clock.now += 3600  # a long pause refills to a minute's worth, no more
    assert [refused(limiter, "a") for _ in range(7)].count(None) == 6


def test_tokens_per_minute_charge_prompt_then_generated_tokens():
    clock = Clock()
    limiter = RateLimiter(AuthConfig(require_api_key=True, tokens_per_minute=600), clock)  # 10 tokens per second
    assert refused(limiter, "a", prompt_tokens=400) is None
    limiter.record("a", 150)
    assert refused(limiter, "a", prompt_tokens=40) is None  # 50 left before it
    limiter.record("a", 60)  # 50 - 40 - 60: 50 tokens in debt
    error = refused(limiter, "a", prompt_tokens=1)
    assert error is not None and error.type == "tokens" and error.headers["Retry-After"] == "5"
    clock.now += 5.1
    assert refused(limiter, "a", prompt_tokens=1) is None


def test_an_unset_limit_never_refuses_while_the_other_one_still_does():
    clock = Clock()
    requests_only = RateLimiter(AuthConfig(require_api_key=True, requests_per_minute=2), clock)
    assert refused(requests_only, "a", prompt_tokens=10**6) is None
    requests_only.record("a", 10**6)  # no token bucket to put in debt
    assert refused(requests_only, "a", prompt_tokens=10**6) is None
    assert refused(requests_only, "a").type == "requests"

    tokens_only = RateLimiter(AuthConfig(require_api_key=True, tokens_per_minute=100), clock)
    assert [refused(tokens_only, "a") for _ in range(1000)] == [None] * 1000  # no request bucket to empty
    tokens_only.record("a", 101)
    assert refused(tokens_only, "a").type == "tokens"

    no_limits = RateLimiter(AuthConfig(require_api_key=True), clock)
    for _ in range(1000):
        assert refused(no_limits, "a", prompt_tokens=10**6) is None
        no_limits.record("a", 10**6)


# request limits

LIMITS = LimitsConfig(max_tokens=100, max_logprobs=3, max_stop_sequences=2, max_stop_length=5, max_prompt_tokens=8, max_messages=3)


@pytest.mark.parametrize(
    "params, param",
    [
        (SamplingParams(max_tokens=101), "max_tokens"),
        (SamplingParams(logprobs=4), "logprobs"),
        (SamplingParams(prompt_logprobs=4), "prompt_logprobs"),
        (SamplingParams(stop=["a", "b", "c"]), "stop"),
        (SamplingParams(stop=["longer"]), "stop"),
    ],
)
def test_sampling_over_the_limits_is_refused(params, param):
    with pytest.raises(InvalidRequestError) as error:
        limit_sampling(params, LIMITS, max_tokens_given=True)
    assert error.value.param == param


def test_sampling_within_the_limits_passes_and_a_missing_max_tokens_is_capped():
    at_the_limits = SamplingParams(max_tokens=100, logprobs=3, prompt_logprobs=3, stop=["a", "12345"])
    limit_sampling(at_the_limits, LIMITS, max_tokens_given=True)
    assert at_the_limits == SamplingParams(max_tokens=100, logprobs=3, prompt_logprobs=3, stop=["a", "12345"])  # unchanged
    unbounded = SamplingParams(max_tokens=None)
    limit_sampling(unbounded, LIMITS, max_tokens_given=False)
    assert unbounded.max_tokens == 100
    short_default = SamplingParams()
    limit_sampling(short_default, LIMITS, max_tokens_given=False)
    assert short_default.max_tokens == 16


def test_prompt_and_messages_limits():
    limit_prompt(list(range(8)), LIMITS)
    with pytest.raises(InvalidRequestError, match="9 tokens"):
        limit_prompt(list(range(9)), LIMITS)
    limit_prompt(list(range(10**4)), LimitsConfig())  # unset: only the context length counts (in the engine)
    limit_messages(3, LIMITS)
    with pytest.raises(InvalidRequestError, match="at most 3 messages"):
        limit_messages(4, LIMITS)
