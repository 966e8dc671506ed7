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
    # Mixture of experts (Mixtral, Qwen3-MoE; models/moe.py), parsed by _moe_fields.
    num_experts: int = 0  # 0: a dense MLP on every layer
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # one expert's width
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    round_router_weights: bool = False  # Qwen3-MoE rounds them to the model dtype; Mixtral not
    moe_layers: tuple[bool, ...] = ()  # per layer: experts (True) or the dense MLP
    # Gemma 2 / Gemma 3 text / Phi-3 (models/gemma2.py, gemma3.py, phi3.py), by _gemma_phi_fields.
    query_pre_attn_scalar: float = 0.0  # attention scale is this ** -0.5 (0: head_dim ** -0.5)
    attn_logit_softcapping: float = 0.0  # cap * tanh(score / cap) before softmax (0: none)
    final_logit_softcapping: float = 0.0  # the same on the LM head's logits (0: none)
    local_rope_theta: float = 0.0  # sliding layers' own rotary base (Gemma 3); 0: the global one
    local_rope_scaling: dict | None = None  # and their scaling (the global layers': rope_scaling)
    partial_rotary_factor: float = 1.0  # rotary covers int(head_dim * this) of each head

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
        raw = _with_gemma_phi_defaults(raw, arch)
        num_heads = _required(raw, "num_attention_heads")
        hidden = _required(raw, "hidden_size")
        num_layers = _required(raw, "num_hidden_layers")
        head_dim = raw.get("head_dim") or (
            128 if arch == "Qwen3ForCausalLM" else hidden // num_heads
        )
        rope_theta, rope_scaling = _rope(raw)
        sliding_window, layer_types = _sliding_window(raw, arch, num_layers)
        is_llama_like = arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
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
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw, generation or {}),
            o_proj_bias=is_llama_like and bool(raw.get("attention_bias")),
            mlp_bias=arch == "LlamaForCausalLM" and bool(raw.get("mlp_bias")),
            hidden_act=raw.get("hidden_act", "silu"),
            layer_types=layer_types,
            **_moe_fields(raw, arch, num_layers),
            **_gemma_phi_fields(raw, arch),
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
    if arch == "Qwen3MoeForCausalLM":  # one window on every layer, only when switched on
        return (raw.get("sliding_window") or 0) if raw.get("use_sliding_window") else 0, ()
    if arch == "MistralForCausalLM":
        return raw.get("sliding_window", 4096) or 0, ()
    return raw.get("sliding_window") or 0, tuple(raw.get("layer_types") or ())


def _moe_fields(raw: dict, arch: str, num_layers: int) -> dict[str, Any]:
    """The experts of Mixtral (every layer; experts as wide as `intermediate_size`) and
    Qwen3-MoE (layers (i + 1) % decoder_sparse_step == 0 not in mlp_only_layers), with
    transformers' defaults."""
    if arch == "MixtralForCausalLM":
        return dict(num_experts=raw.get("num_local_experts", 8),
                    num_experts_per_tok=raw.get("num_experts_per_tok", 2),
                    moe_intermediate_size=_required(raw, "intermediate_size"),
                    moe_layers=(True,) * num_layers)
    if arch != "Qwen3MoeForCausalLM":
        return {}
    experts = raw.get("num_experts", raw.get("num_local_experts", 128))
    step = raw.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"config.json: decoder_sparse_step must be an integer >= 1, got {step!r}")
    dense = raw.get("mlp_only_layers") or []
    if not all(isinstance(i, int) and 0 <= i < num_layers for i in dense):
        raise ValueError(f"config.json: mlp_only_layers must list layer indices below "
                         f"{num_layers}, got {dense!r}")
    return dict(num_experts=experts, num_experts_per_tok=raw.get("num_experts_per_tok", 8),
                moe_intermediate_size=raw.get("moe_intermediate_size", 768),
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)), round_router_weights=True,
                moe_layers=tuple(experts > 0 and i not in dense and (i + 1) % step == 0
                                 for i in range(num_layers)))


# Gemma 2, Gemma 3 text and Phi-3: transformers' config-class defaults for the keys a config.json
# may omit (the file's own keys win).
_GEMMA_PHI_DEFAULTS: dict[str, dict[str, Any]] = {
    "Gemma2ForCausalLM": dict(
        head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
        tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window_pattern=2),
    "Gemma3ForCausalLM": dict(
        head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
        tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6),
    "Phi3ForCausalLM": dict(max_position_embeddings=4096, original_max_position_embeddings=4096),
}


def _with_gemma_phi_defaults(raw: dict, arch: str) -> dict:
    """raw with its architecture's defaults under it; Gemma's per-layer-type rope parameters
    (transformers 5) flattened to the global layers' (the sliding ones': _gemma_phi_fields);
    Gemma's layer types defaulted from the sliding-window pattern; Phi-3's `su` rope as
    `longrope` with the top-level original length, which transformers puts first."""
    if arch not in _GEMMA_PHI_DEFAULTS:
        return raw
    raw = {**_GEMMA_PHI_DEFAULTS[arch], **raw}
    if arch.startswith("Gemma"):
        raw["hidden_act"] = raw["hidden_activation"]
        params = raw.get("rope_parameters") or {}
        if "full_attention" in params or "sliding_attention" in params:
            raw["rope_parameters"] = params.get("full_attention") or {}
            raw["sliding_rope_parameters"] = params.get("sliding_attention")
        pattern = raw["sliding_window_pattern"]  # (transformers ignores `_sliding_window_pattern`)
        raw.setdefault("layer_types", [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(_required(raw, "num_hidden_layers"))])
        return raw
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if (params.get("rope_type") or params.get("type")) in ("su", "yarn", "longrope"):
        params.pop("type", None)
        params["rope_type"] = "longrope"
        params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        raw["rope_parameters"] = params
    return raw


def _gemma_phi_fields(raw: dict, arch: str) -> dict[str, Any]:
    if arch not in _GEMMA_PHI_DEFAULTS:
        return {}
    params = raw.get("rope_parameters") or {}
    fields: dict[str, Any] = dict(
        partial_rotary_factor=float(params.get("partial_rotary_factor")
                                    or raw.get("partial_rotary_factor") or 1.0))
    if arch == "Phi3ForCausalLM":
        return fields
    if raw.get("use_bidirectional_attention"):
        raise ValueError(f"config.json: {arch} with use_bidirectional_attention is not a causal "
                         "language model")
    fields.update(
        query_pre_attn_scalar=float(raw["query_pre_attn_scalar"]),
        attn_logit_softcapping=float(raw.get("attn_logit_softcapping") or 0.0),
        final_logit_softcapping=float(raw.get("final_logit_softcapping") or 0.0))
    if arch == "Gemma3ForCausalLM":
        local = raw.get("sliding_rope_parameters")
        fields["local_rope_theta"], fields["local_rope_scaling"] = _rope(
            {"rope_parameters": local} if local else {"rope_theta": raw["rope_local_base_freq"]})
    return fields


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
