"""Which implementation runs a model: pagedserve's native class, or transformers' own modeling
code on pagedserve's attention (the fallback, models/transformers_backend.py).

    auto          native when the architecture is in MODEL_REGISTRY, else the fallback
    native        MODEL_REGISTRY only
    transformers  the fallback, even where a native class exists

What config.json alone shows cannot run is refused here, before any weight is read, with one
message naming the architecture and why; the load probe (transformers_probe.py) refuses the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from pagedserve.executor.config import MODEL_IMPLS
from pagedserve.executor.models import MODEL_REGISTRY
from pagedserve.executor.models.transformers_probe import UnsupportedModel

log = structlog.get_logger("pagedserve.executor.models.impl")

# Recurrent or state-space layers: their per-sequence state is not a paged K/V cache.
STATE_SPACE_TYPES = frozenset({
    "bamba", "bailing_hybrid", "falcon_h1", "falcon_mamba", "granitemoehybrid", "jamba",
    "kimi_linear", "lfm2", "lfm2_moe", "lfm3", "mamba", "mamba2", "minimax", "nemotron_h",
    "olmo_hybrid", "qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next",
    "recurrent_gemma", "rwkv", "xlstm", "zamba", "zamba2",
})
PAGED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def read_config(model_dir: Path) -> dict:
    file = Path(model_dir) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"config.json not found in model directory {model_dir}")
    return json.loads(file.read_text())


def config_dtype(raw: dict) -> str | None:
    """The checkpoint's dtype as config.json names it (transformers 5: `dtype`)."""
    return raw.get("dtype") or raw.get("torch_dtype")


def architecture(raw: dict) -> str:
    archs = raw.get("architectures") or []
    if not archs:
        raise ValueError("config.json: no `architectures` entry; cannot tell which model class "
                         "to use")
    return archs[0]


def choose_model_impl(raw: dict, requested: str = "auto", trust_remote_code: bool = False) -> str:
    """'native' or 'transformers' for this config.json, logged; UnsupportedModel when neither
    can run it."""
    if requested not in MODEL_IMPLS:
        raise ValueError(f"model_impl: {requested!r} is not one of {', '.join(MODEL_IMPLS)}")
    arch = architecture(raw)
    native = arch in MODEL_REGISTRY
    if requested == "native" and not native:
        raise UnsupportedModel(
            f"{arch}: no native implementation (native: {', '.join(sorted(MODEL_REGISTRY))}); "
            "--model-impl auto or transformers (LLM(model_impl=...)) runs it on transformers' code")
    if requested == "native" or (requested == "auto" and native):
        log.info("model implementation: native", architecture=arch,
                 model_class=MODEL_REGISTRY[arch].__name__)
        return "native"
    check_transformers_config(raw, trust_remote_code)
    why = "requested" if requested == "transformers" else "no native implementation"
    log.info("model implementation: transformers fallback", architecture=arch, reason=why)
    return "transformers"


def check_transformers_config(raw: dict, trust_remote_code: bool = False) -> None:
    """UnsupportedModel naming the architecture when config.json shows that the fallback cannot
    run it."""
    arch = architecture(raw)
    model_type = raw.get("model_type", "")

    def refuse(why: str) -> UnsupportedModel:
        return UnsupportedModel(f"{arch}: {why}")

    if raw.get("auto_map") and not trust_remote_code:
        raise refuse("its modeling code ships with the checkpoint (config.json auto_map); pass "
                     "--trust-remote-code (LLM(trust_remote_code=True)) to run it")
    if raw.get("is_encoder_decoder"):
        raise refuse("an encoder-decoder model; pagedserve serves decoder-only models")
    if model_type in STATE_SPACE_TYPES:
        raise refuse(f"model type {model_type!r} has state-space or recurrent layers, whose state "
                     "is not a paged K/V cache")
    odd = sorted(set(raw.get("layer_types") or ()) - PAGED_LAYER_TYPES)
    if odd:
        raise refuse(f"layer types {odd} are not attention over a paged K/V cache (full or "
                     "sliding-window)")
    if raw.get("alibi") or raw.get("position_embedding_type") == "alibi" or (
            (raw.get("attn_config") or {}).get("alibi")):
        raise refuse("ALiBi position bias reaches attention as a mask, which the paged kernels "
                     "do not take")
    if raw.get("auto_map"):
        return  # the model's own classes: the load probe checks them
    _check_transformers_class(arch, model_type)


def transformers_class(model_type: str) -> type | None:
    """transformers' causal-LM class for a model type, or None."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def _check_transformers_class(arch: str, model_type: str) -> None:
    import transformers

    cls = transformers_class(model_type)
    if cls is None:
        raise UnsupportedModel(f"{arch}: transformers {transformers.__version__} has no causal "
                               f"language model for model type {model_type!r}")
    if cls.__name__ != arch and hasattr(transformers, arch):  # would load into the wrong class
        raise UnsupportedModel(f"{arch}: config.json's model type {model_type!r} is "
                               f"transformers' {cls.__name__}, not the {arch} it names")
    if not cls._can_set_attn_implementation():
        raise UnsupportedModel(f"{arch}: its attention does not go through transformers' "
                               "AttentionInterface, where pagedserve plugs in")
