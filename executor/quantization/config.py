"""Which quantized format a checkpoint is in: config.json's `quantization_config` (or AutoGPTQ's
older quantize_config.json beside it), read once into a frozen QuantSpec.

`--quantization METHOD` (pagedserve serve, LLM(quantization=...)) names the format the user
expects: it must agree with the checkpoint's (a mismatch is refused, not guessed around), and a
dense checkpoint is not quantized at load (make one with `pagedserve quantize`). Each format's
reader checks its own fields (bits, group size, layout version) when it opens the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

METHODS = ("awq", "gptq", "compressed-tensors", "fp8")
_ALIASES = {"compressed_tensors": "compressed-tensors", "ct": "compressed-tensors"}
# what --quantization takes; "dequantize": a GGUF file's quantized tensors expanded to the
# compute dtype at load (what engines without quantized kernels do; a baseline to compare with)
DEQUANTIZE = "dequantize"
OVERRIDES = ("auto", *METHODS, DEQUANTIZE)


@dataclass(frozen=True)
class QuantSpec:
    method: str  # one of METHODS
    params: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # as written

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def field_error(self, key: str, reason: str) -> ValueError:
        """A refusal naming the quantization_config field and why."""
        return ValueError(f"quantization_config.{key}: {self.get(key)!r} {reason} "
                          f"({self.method} checkpoint)")


def method_name(name: str | None) -> str:
    """The canonical --quantization value; ValueError naming the choices otherwise."""
    name = "auto" if name is None else _ALIASES.get(str(name).lower(), str(name).lower())
    if name not in OVERRIDES:
        raise ValueError(f"quantization: must be one of {OVERRIDES}, got {name!r}")
    return name


def _raw_quantization(model_dir: Path, raw_config: dict) -> dict | None:
    config = raw_config.get("quantization_config")
    if config is None and (model_dir / "quantize_config.json").is_file():  # AutoGPTQ's own file
        config = {"quant_method": "gptq", **json.loads((model_dir / "quantize_config.json")
                                                        .read_text())}
    return config


def read_quantization(model_dir: Path, raw_config: dict,
                      override: str | None = None) -> QuantSpec | None:
    """The checkpoint's format (None: dense), checked against the --quantization override;
    a ValueError names config.json."""
    try:
        wanted = method_name(override)
        if wanted == DEQUANTIZE:
            raise ValueError(f"quantization: {DEQUANTIZE!r} applies to GGUF files only (a "
                             "quantized HF checkpoint runs in its own format)")
        return _read(model_dir, raw_config, wanted)
    except ValueError as e:
        raise ValueError(f"{Path(model_dir) / 'config.json'}: {e}") from None


def _read(model_dir: Path, raw_config: dict, wanted: str) -> QuantSpec | None:
    config = _raw_quantization(Path(model_dir), raw_config)
    if config is None:
        if wanted != "auto":
            raise ValueError(f"quantization: {wanted!r} was asked for, but {model_dir} has no "
                             "quantization_config (a dense checkpoint is not quantized at load: "
                             "make a quantized copy with `pagedserve quantize`)")
        return None
    if not isinstance(config, dict) or "quant_method" not in config:
        raise ValueError("quantization_config: expected an object with a quant_method")
    found = _ALIASES.get(str(config["quant_method"]).lower(), str(config["quant_method"]).lower())
    if found not in METHODS:
        raise ValueError(f"quantization_config.quant_method: {config['quant_method']!r} is not "
                         f"supported; supported: {METHODS}")
    if wanted not in ("auto", found):
        raise ValueError(f"quantization: {wanted!r} was asked for, but the checkpoint is "
                         f"{found!r} (quantization_config.quant_method)")
    return QuantSpec(found, MappingProxyType(dict(config)))
