"""Per-layer fp8 KV-cache scales from a checkpoint, where it carries them.

FP8 checkpoints made with a calibrated KV cache store, per attention layer, the factor a stored
e4m3 key (value) is multiplied by: `self_attn.k_scale` / `self_attn.v_scale` (vLLM's and
llm-compressor's names), `self_attn.kv_scale` (older files: one for both), or
`k_proj.output_scale` / `v_proj.output_scale` (compressed-tensors). A layer without one gets
1.0, as vLLM does. GGUF files and directories without safetensors have none.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale|"
                   r"k_proj\.output_scale|v_proj\.output_scale)$")
_WHICH = {"k_scale": "k", "k_proj.output_scale": "k", "v_scale": "v",
          "v_proj.output_scale": "v", "kv_scale": "kv"}


def is_kv_scale(name: str) -> bool:
    """Whether a checkpoint tensor is a KV-cache scale (read here, not a model weight)."""
    return _NAME.search(name) is not None


def read_kv_scales(model_dir: str | Path, num_layers: int) -> tuple[list[float], list[float]]:
    """(k_scales, v_scales), one per layer; ValueError naming a tensor that is not one positive
    finite number."""
    k, v = [1.0] * num_layers, [1.0] * num_layers
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                match = _NAME.search(name)
                if match is None or int(match.group(1)) >= num_layers:
                    continue
                tensor = f.get_tensor(name)
                if tensor.numel() != 1 or not 0 < float(tensor.float()) < float("inf"):
                    raise ValueError(f"{file.name}: tensor {name!r}: a KV-cache scale must be one "
                                     f"positive finite number, got shape {tuple(tensor.shape)}")
                layer, which = int(match.group(1)), _WHICH[match.group(2)]
                if "k" in which:
                    k[layer] = float(tensor.float())
                if "v" in which:
                    v[layer] = float(tensor.float())
    return k, v
