"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from serving.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]


ConstraintKind = Literal["json", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must match; the engine compiles it (serving/engine/structured.py).

    `spec` is the JSON schema as JSON text ("json"), a regular expression ("regex"), the allowed
    strings as a JSON list ("choice"), or a Lark grammar in llguidance's syntax ("grammar").
    Equal constraints share one compiled grammar.
    """

    kind: ConstraintKind
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in ("json", "regex", "choice", "grammar"):
            raise InvalidRequestError(f"unknown constraint kind {self.kind!r}", param="constraint")


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0  # EOS and stop_token_ids are masked, and stop strings not checked, until this many tokens
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per output token (0: the chosen token only)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before sampling
    constraint: OutputConstraint | None = None  # only tokens that keep the output matching it are sampled

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check(isinstance(self.n, int) and self.n >= 1, "n", "n must be an integer >= 1")
        self._check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "max_tokens must be >= 1")
        self._check(self.min_tokens >= 0, "min_tokens", "min_tokens must be >= 0")
        self._check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "min_tokens must be at most max_tokens")
        self._check(self.temperature >= 0, "temperature", "temperature must be >= 0")
        self._check(0 < self.top_p <= 1, "top_p", "top_p must be in (0, 1]")
        self._check(self.top_k >= 0 or self.top_k == -1, "top_k", "top_k must be >= 0 (or -1 for all)")
        self._check(0 <= self.min_p <= 1, "min_p", "min_p must be in [0, 1]")
        self._check(-2 <= self.presence_penalty <= 2, "presence_penalty", "presence_penalty must be in [-2, 2]")
        self._check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "frequency_penalty must be in [-2, 2]")
        self._check(self.repetition_penalty > 0, "repetition_penalty", "repetition_penalty must be > 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            self._check(value is None or 0 <= value <= MAX_LOGPROBS, name, f"{name} must be in [0, {MAX_LOGPROBS}]")
        self._check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        self._check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "stop_token_ids must be token ids (>= 0)")
        self._check(all(t >= 0 for t in self.logit_bias), "logit_bias", "logit_bias keys must be token ids (>= 0)")
        self._check(
            all(-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for b in self.logit_bias.values()),
            "logit_bias",
            f"logit_bias values must be in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
        )
        if self.top_k == -1:
            self.top_k = 0

    @staticmethod
    def _check(ok: bool, param: str, message: str) -> None:
        if not ok:
            raise InvalidRequestError(message, param=param)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def adjusts_logits(self) -> bool:
        """Penalties, logit_bias or min_tokens change this request's logits before sampling."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0
