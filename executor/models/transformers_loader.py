"""Loading a model for the transformers fallback: transformers reads the weights (safetensors only),
the probe checks the model and numbers its attention layers, and a ModelConfig for the executor is
made from what the probe measured (the K/V shape the cache needs) and config.json.

The weights load before the KV pool is sized, as for native models, so the executor's memory
budget for the pool (a byte count on the CPU, a share of what is free on a GPU) still holds.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import torch

from pagedserve.executor.model_config import (
    DEFAULT_ROPE_THETA,
    ModelConfig,
    _eos_ids,
    _read_generation_config,
)
from pagedserve.executor.models.impl import architecture, read_config
from pagedserve.executor.models.transformers_backend import (
    ATTN_IMPLEMENTATION,
    TransformersForCausalLM,
    register_attention,
)
from pagedserve.executor.models.transformers_cpu import pack_linears, unpack_linears
from pagedserve.executor.models.transformers_probe import AttentionShape, probe_hidden, probe_model
from pagedserve.kernels.backend import KernelBackend

DEFAULT_MAX_POSITIONS = 2048  # for a config that names no context length
log = structlog.get_logger("pagedserve.executor.models.transformers_loader")


def load_transformers_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device,
                            backend: KernelBackend, *, trust_remote_code: bool = False,
                            ) -> tuple[TransformersForCausalLM, ModelConfig]:
    """(model in eval mode, config) for a directory config.json's checks have already passed."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    raw = read_config(model_dir)
    register_attention()
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
            use_safetensors=True, trust_remote_code=trust_remote_code,
            device_map={"": str(device)} if device.type != "cpu" else None)
    except OSError as e:  # no safetensors (pytorch .bin weights are never unpickled)
        raise FileNotFoundError(f"{model_dir}: {e}") from None
    hf.eval().requires_grad_(False)
    model = TransformersForCausalLM(hf, backend)
    shape = probe_model(model, architecture(raw))
    if device.type == "cpu":
        _pack_checked(model, architecture(raw))
    model.config = _model_config(raw, _read_generation_config(model_dir), hf, shape, dtype)
    return model.eval(), model.config


def _pack_checked(model: TransformersForCausalLM, arch: str) -> None:
    """Linear weights into the CPU GEMM's packed layout (transformers_cpu.py), kept only when the
    probe's output stays what it was (bf16 packing is bit-exact, float32 reorders sums)."""
    before = probe_hidden(model).float()
    swaps = pack_linears(model.hf)
    try:
        after = probe_hidden(model).float()
        same = torch.allclose(after, before, rtol=1e-3, atol=1e-3 * float(before.abs().max()))
    except Exception as e:  # any failure: run unpacked, as the probe passed
        same, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "its output changed"
    if not same:
        unpack_linears(swaps)
        log.warning("linear weights stay unpacked on the CPU", architecture=arch, reason=why)


def _model_config(raw: dict, generation: dict, hf: torch.nn.Module, shape: AttentionShape,
                  dtype: torch.dtype) -> ModelConfig:
    """The facts the executor uses (cache shape, vocabulary, context length, EOS ids); the rest
    only describe the model."""
    cfg = hf.config
    return ModelConfig(
        architecture=architecture(raw),
        vocab_size=hf.get_output_embeddings().weight.shape[0],  # the logits' width
        hidden_size=cfg.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=getattr(cfg, "intermediate_size", None) or 0,
        rms_norm_eps=float(getattr(cfg, "rms_norm_eps", None) or 1e-6),
        max_position_embeddings=getattr(cfg, "max_position_embeddings", None)
        or DEFAULT_MAX_POSITIONS,
        rope_theta=DEFAULT_ROPE_THETA,
        rope_scaling=None,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        sliding_window=0,  # per layer, read from each attention module at run time
        attention_bias=False,
        qk_norm=False,
        torch_dtype=str(dtype).removeprefix("torch."),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw, generation),
    )
