"""SamplingParams: what a user asks of one prompt's completions, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from pagedserve.protos import executor_pb2
from pagedserve.router.errors import RouterError
from pagedserve.router.structured_outputs import Constraint, from_structured_outputs


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One output constraint (vLLM's names): a JSON schema (dict or JSON text), any JSON
    object, a regex the whole output matches, one string of a list, or a grammar (Lark, or GBNF
    with ::= rules). Set exactly one."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def constraint(self) -> Constraint:
        """The canonical constraint; ValueError naming the field when it is malformed."""
        try:
            c = from_structured_outputs(
                {k: getattr(self, k) for k in ("json", "regex", "choice", "grammar",
                                               "json_object")})
        except RouterError as e:
            raise ValueError(f"{e.param}: {e.message}") from None
        assert c is not None
        return c


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")


def _finite(name: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value), name, f"must be a finite number, got {value!r}")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # top logprobs per generated token (0: only the sampled one)
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output

    def __post_init__(self) -> None:
        self._validate_counts()
        self._validate_floats()
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        for t in self.stop_token_ids:
            _check(t >= 0, "stop_token_ids", f"token ids must be >= 0, got {t}")
        for tok, bias in (self.logit_bias or {}).items():
            _check(int(tok) >= 0, "logit_bias", f"token ids must be >= 0, got {tok}")
            _finite("logit_bias", bias)
        self._validate_structured()

    def _validate_structured(self) -> None:
        so = self.structured_outputs
        if so is None:
            return
        _check(isinstance(so, StructuredOutputsParams), "structured_outputs",
               "must be a StructuredOutputsParams")
        self._constraint = so.constraint()
        # EOS must stay allowed wherever the grammar ends; these would take it away.
        _check(self.min_tokens == 0, "min_tokens", "cannot be combined with structured_outputs")
        _check(not self.ignore_eos, "ignore_eos", "cannot be combined with structured_outputs")

    @property
    def constraint(self) -> Constraint | None:
        return getattr(self, "_constraint", None)

    def constrained_by(self, constraint: Constraint) -> SamplingParams:
        """A copy whose output follows constraint (LLM.chat's tool grammar), checked as a
        structured_outputs one would be."""
        _check(self.constraint is None, "structured_outputs",
               f"cannot be combined with {constraint.param} (both constrain the output)")
        _check(self.min_tokens == 0, "min_tokens", f"cannot be combined with {constraint.param}")
        _check(not self.ignore_eos, "ignore_eos", f"cannot be combined with {constraint.param}")
        out = replace(self)
        out._constraint = constraint
        return out

    def _validate_counts(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None:
            _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
                   f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1), "top_k",
               f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None:
            _check(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed",
                   f"must be an integer in [0, 2**63), got {self.seed!r}")
        if self.logprobs is not None:
            _check(isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20, "logprobs",
                   f"must be an integer in [0, 20], got {self.logprobs!r}")

    def _validate_floats(self) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            _finite(name, getattr(self, name))
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, name, f"must be in [-2, 2], got {value}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")

    def to_proto(self) -> executor_pb2.SamplingParams:
        """The sampling half of the request; the stop rules go to the scheduler as its own
        arguments, which also give each of n children its seed (protos/choice_seed.py)."""
        proto = executor_pb2.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
        )
        if self.seed is not None:
            proto.seed = self.seed  # checked in [0, 2**63): a uint64 as it is
        if self.logprobs is not None:
            proto.logprobs = self.logprobs
        for tok, bias in (self.logit_bias or {}).items():
            proto.logit_bias[int(tok)] = float(bias)
        if self.constraint is not None:
            proto.structured.grammar = self.constraint.grammar
        return proto
