"""What a server or LLM asks of speculative decoding: `--speculative-config` (JSON, as vLLM spells
it) or `LLM(speculative_config=...)`, checked once into a frozen object.

Only prompt lookup (`method: "ngram"`) runs today; a draft model or EAGLE-style heads would be
further methods proposing through the same path (the scheduler sends each running request's
proposal with its plan; the executor verifies it: docs/architecture.md, "Speculative decoding").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram",)
_FIELDS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
           "disable_by_batch_size")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most tokens proposed per request per step
    prompt_lookup_min: int = 2  # the shortest suffix n-gram a proposal may match on
    prompt_lookup_max: int = 4  # the longest, tried first
    # no proposals in a step with more running requests than this (None: always propose); a
    # large batch is compute-bound, where verifying drafts costs what it saves
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method: {self.method!r} is not supported "
                             f"(supported: {', '.join(METHODS)}; a draft model is not yet)")
        for name in _FIELDS[1:]:
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
