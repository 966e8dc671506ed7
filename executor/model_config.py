"""The facts about a model that the executor needs, parsed once from an HF-format config.json.

Architecture-neutral: model code reads these fields and never the raw JSON. Where a field is absent,
the default is the one transformers' config class for that architecture uses, so both load the
same checkpoint the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# transformers' per-architecture defaults for keys a config.json may omit.
_MAX_POSITIONS = {
    "LlamaForCausalLM": 2048,
    "MistralForCausalLM": 4096 * 32,
    "Qwen2ForCausalLM": 32768,
    "Qwen3ForCausalLM": 32768,
}
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None  # None = plain RoPE; else {"rope_type": ..., scaling parameters}
    tie_word_embeddings: bool
    sliding_window: int  # 0 = none; applies to the layers `layer_types` marks "sliding_attention"
    attention_bias: bool  # bias on q/k/v projections
    qk_norm: bool  # per-head RMSNorm of q and k before rotary (Qwen3)
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    o_proj_bias: bool = False  # Llama/Qwen3 `attention_bias` also puts a bias on o_proj
    mlp_bias: bool = False
    hidden_act: str = "silu"
    layer_types: tuple[
        str, ...
    ] = ()  # per layer "full_attention" | "sliding_attention"; () = all sliding

    def layer_sliding_window(self, layer: int) -> int:
        """The sliding window of one layer (0 = full attention)."""
        if not self.sliding_window or not self.layer_types:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Parse `path`/config.json (and eos ids from generation_config.json when present)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"config.json not found in model directory {path}")
        raw = json.loads(config_file.read_text())
        return cls.from_dict(raw, generation=_read_generation_config(path))

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        arch = _architecture(raw)
        num_heads = _required(raw, "num_attention_heads")
        hidden = _required(raw, "hidden_size")
        num_layers = _required(raw, "num_hidden_layers")
        head_dim = raw.get("head_dim") or (
            128 if arch == "Qwen3ForCausalLM" else hidden // num_heads
        )
        rope_theta, rope_scaling = _rope(raw)
        sliding_window, layer_types = _sliding_window(raw, arch, num_layers)
        is_llama_like = arch in ("LlamaForCausalLM", "Qwen3ForCausalLM")
        return cls(
            architecture=arch,
            vocab_size=_required(raw, "vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=_required(raw, "intermediate_size"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings")
            or _MAX_POSITIONS.get(arch, 2048),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            # Qwen2 always has q/k/v biases (its config has no switch); Mistral never has.
            attention_bias=arch in ("Qwen2ForCausalLM",)
            or (is_llama_like and bool(raw.get("attention_bias"))),
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw, generation or {}),
            o_proj_bias=is_llama_like and bool(raw.get("attention_bias")),
            mlp_bias=arch == "LlamaForCausalLM" and bool(raw.get("mlp_bias")),
            hidden_act=raw.get("hidden_act", "silu"),
            layer_types=layer_types,
        )


def _architecture(raw: dict) -> str:
    archs = raw.get("architectures") or []
    if not archs:
        raise ValueError(
            "config.json: no `architectures` entry; cannot tell which model class to use"
        )
    return archs[0]


def _required(raw: dict, key: str) -> Any:
    if raw.get(key) is None:
        raise ValueError(f"config.json: required key {key!r} is missing")
    return raw[key]


def _rope(raw: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from transformers-5 `rope_parameters` or the older `rope_scaling` +
    `rope_theta`. Plain RoPE gives scaling None; llama3 gets its original length defaulted the way
    transformers' standardize_rope_params does."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or raw.get("rope_theta") or DEFAULT_ROPE_THETA)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn", "longrope"):
        params.setdefault(
            "original_max_position_embeddings",
            raw.get("original_max_position_embeddings") or raw.get("max_position_embeddings"),
        )
    return theta, {"rope_type": rope_type, **params}


def _sliding_window(raw: dict, arch: str, num_layers: int) -> tuple[int, tuple[str, ...]]:
    """Mistral: one window on every layer (transformers defaults it to 4096 when the key is absent).
    Qwen2/3: a window only with use_sliding_window, on the layers `layer_types` marks (or, for older
    configs, layers >= max_window_layers)."""
    if arch in _QWEN:
        if not raw.get("use_sliding_window", False):
            return 0, ()
        window = raw.get("sliding_window", 4096) or 0
        types = raw.get("layer_types") or [
            "sliding_attention"
            if window and i >= raw.get("max_window_layers", 28)
            else "full_attention"
            for i in range(num_layers)
        ]
        return window, tuple(types)
    if arch == "MistralForCausalLM":
        return raw.get("sliding_window", 4096) or 0, ()
    return raw.get("sliding_window") or 0, tuple(raw.get("layer_types") or ())


def _eos_ids(raw: dict, generation: dict) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json together: Llama-3 instruct checkpoints
    list <|eot_id|> only in the latter, and generation must stop on it."""
    ids: list[int] = []
    for source in (raw, generation):
        value = source.get("eos_token_id")
        for tok in value if isinstance(value, list) else [value]:
            if tok is not None and tok not in ids:
                ids.append(int(tok))
    return tuple(ids)


def _read_generation_config(path: Path) -> dict:
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
