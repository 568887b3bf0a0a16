"""Per-API-key rate limits in requests and tokens per minute, as token buckets.

Each key has a bucket per limit that holds up to a minute's allowance and refills continuously at
allowance/60 per second, so a key may burst its whole minute at once and then goes at the steady
rate. A request is admitted while its key has a request left and is not in token debt; it takes
one request and its prompt tokens at admission, and its generated tokens when it ends (which may
put the token bucket in debt: the key's next request waits until it is paid off). Refusals carry
the seconds until the key would be admitted again.

The buckets live in each API replica (one by default, so the limits hold exactly); with N API
replicas a key can get up to N times its limits. That is the trade for keeping a round trip to a
shared actor off every request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.config import AuthConfig
from serving.server.http_errors import APIError


@dataclass
class _Bucket:
    per_minute: int
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.updated) * self.per_minute / 60)
        self.updated = now

    def seconds_until(self, level: float) -> float:
        """How long until the bucket holds `level` again (0 if it does)."""
        return max(0.0, (level - self.level) * 60 / self.per_minute)


class RateLimiter:
    """The buckets of every key seen; not thread-safe (the API's handlers share one event loop)."""

    def __init__(self, auth: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = {"requests": auth.requests_per_minute, "tokens": auth.tokens_per_minute}
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def admit(self, key: str, prompt_tokens: int) -> None:
        """Take one request and `prompt_tokens` from the key's buckets, or raise a 429 with Retry-After."""
        now = self._clock()
        requests, tokens = self._bucket(key, "requests", now), self._bucket(key, "tokens", now)
        longest, blocking = 0.0, ""
        for kind, bucket, needed in (("requests", requests, 1.0), ("tokens", tokens, 0.0)):
            if bucket is not None and (wait_s := bucket.seconds_until(needed)) > longest:
                longest, blocking = wait_s, kind
        if longest > 0:
            raise _rate_limited(blocking, self._limits[blocking], longest)
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= prompt_tokens

    def record(self, key: str, generated_tokens: int) -> None:
        """Charge the tokens a request generated to its key."""
        if (tokens := self._bucket(key, "tokens", self._clock())) is not None:
            tokens.level -= generated_tokens

    def _bucket(self, key: str, kind: str, now: float) -> _Bucket | None:
        per_minute = self._limits[kind]
        if per_minute is None:
            return None
        bucket = self._buckets.setdefault((key, kind), _Bucket(per_minute, per_minute, now))
        bucket.refill(now)
        return bucket


def _rate_limited(kind: str, per_minute: int | None, wait_s: float) -> APIError:
    return APIError(
        429,
        f"rate limit reached for {kind} per minute ({per_minute}) on this API key; retry after {math.ceil(wait_s)} s",
        type=kind,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(math.ceil(wait_s))},
    )
