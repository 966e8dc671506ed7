"""What a server or LLM asks of speculative decoding: `--speculative-config` (JSON, as vLLM spells
it) or `LLM(speculative_config=...)`, checked once into a frozen object.

Two methods (docs/architecture.md, "Speculative decoding"):
- `ngram`, prompt lookup: the scheduler proposes each running request's drafts from its own
  tokens and sends them with its plan; the executor verifies them.
- `draft_model`: a second, smaller model with the target's vocabulary (`model`: a model directory
  or GGUF file) that the executor loads beside the target, with its own KV cache over the same
  blocks. The scheduler only reserves slots and says how many drafts each request may have; the
  executor's draft model proposes them (greedy) and the target verifies them in the same step.
EAGLE-style heads would be a third method proposing in the executor like `draft_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

METHODS = ("ngram", "draft_model")
EXECUTOR_METHODS = ("draft_model",)  # methods whose drafts the executor proposes
_FIELDS = ("method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
           "disable_by_batch_size")
_INT_FIELDS = _FIELDS[2:]


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    model: str | None = None  # draft_model's model directory or GGUF file (required there only)
    num_speculative_tokens: int = 4  # the most tokens proposed per request per step
    prompt_lookup_min: int = 2  # the shortest suffix n-gram a proposal may match on
    prompt_lookup_max: int = 4  # the longest, tried first
    # no proposals in a step with more running requests than this (None: always propose); a
    # large batch is compute-bound, where verifying drafts costs what it saves
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method: {self.method!r} is not supported "
                             f"(supported: {', '.join(METHODS)})")
        self._check_model()
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "disable_by_batch_size":
                continue
            top = 1 << 20 if name == "disable_by_batch_size" else 64
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"speculative_config.{name}: must be an integer in [1, {top}], "
                                 f"got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min: {self.prompt_lookup_min} is "
                             f"more than prompt_lookup_max {self.prompt_lookup_max}")

    def _check_model(self) -> None:
        if isinstance(self.model, PurePath):
            object.__setattr__(self, "model", str(self.model))
        if self.method == "draft_model" and (not isinstance(self.model, str) or not self.model):
            raise ValueError("speculative_config.model: method draft_model needs the draft "
                             f"model's directory or GGUF file, got {self.model!r}")
        if self.method != "draft_model" and self.model is not None:
            raise ValueError(f"speculative_config.model: only method draft_model takes a model "
                             f"(method is {self.method!r})")

    @property
    def executor_proposes(self) -> bool:
        """Whether the executor proposes the drafts (a draft model), not the scheduler."""
        return self.method in EXECUTOR_METHODS

    @property
    def draft_model(self) -> str | None:
        """The executor's draft model path (None unless method is draft_model)."""
        return self.model if self.method == "draft_model" else None

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig | None
              ) -> SpeculativeConfig | None:
        """From a JSON text or a dict (unknown keys named in the error); None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: must be a JSON object, got {value!r}")
        unknown = sorted(set(value) - set(_FIELDS))
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(_FIELDS)})")
        if "prompt_lookup_min" not in value and "prompt_lookup_max" in value:
            value = {**value, "prompt_lookup_min": min(2, value["prompt_lookup_max"])}
        return cls(**value)

    def to_json(self) -> str:
        """The form a process hands the next one (serve's scheduler child takes it as a flag)."""
        return json.dumps({name: getattr(self, name) for name in _FIELDS})
