"""`pagedserve quantize MODEL OUT --method ...`: round-to-nearest quantization of an HF model
directory into a checkpoint this engine (and the formats' other readers) load, with no GPU and
no calibration data. The decoder layers' linear weights are quantized; embeddings, the LM head,
norms, MoE experts and routers stay as they are.

    int8              compressed-tensors pack-quantized W8A16: symmetric, one scale per output
                      channel (stored in the model's dtype)
    int4-awq-format   AutoAWQ GEMM layout: 4-bit, symmetric (zero point 8), group 128 where the
                      inputs allow it, else 64 or 32; fp16 scales
    fp8               quant_method fp8: e4m3 weights, one float32 scale per output channel

config.json gains the quantization_config; tokenizer and other files are copied unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pagedserve.executor.quantization.packing import AWQ_SLOTS, pack_int32
from pagedserve.kernels.quantized import QuantizedWeight, quantize_rtn

METHODS = ("int8", "int4-awq-format", "fp8")
_LINEAR = re.compile(r"\.layers\.\d+\.(?!.*\.experts\.)[\w.]*_proj\.weight$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
FP8_MAX = 448.0  # the largest finite e4m3 value
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and bool(_LINEAR.search(name))


def awq_group(shapes: list[tuple[int, int]]) -> int:
    """The one group size (config.json has one) that divides every layer's inputs."""
    group = next((g for g in (128, 64, 32) if all(i % g == 0 for _, i in shapes)), None)
    if group is None or any(o % 8 for o, _ in shapes):
        raise ValueError(f"layer shapes {sorted(set(shapes))}: AWQ needs outputs in multiples of "
                         "8 and a group size of 128, 64 or 32 dividing every layer's inputs")
    return group


def quantize_weight(weight: torch.Tensor, method: str, scale_dtype: torch.dtype = torch.float32,
                    group: int = 128) -> QuantizedWeight | torch.Tensor:
    """What the checkpoint will hold for one weight, as the values it means: a QuantizedWeight
    whose scales are already rounded to their stored dtype (int8; int4 with `group`), or the fp8
    weight's dequantized values (fp8)."""
    if method == "fp8":
        w8, scale = fp8_channelwise(weight)
        return w8.to(torch.float32) * scale
    bits, group, dtype = {"int8": (8, weight.shape[1], scale_dtype),
                          "int4-awq-format": (4, group, torch.float16)}[method]
    qw = quantize_rtn(weight, bits, group, symmetric=True)
    scale = qw.scale.to(dtype).to(torch.float32)
    return QuantizedWeight(qw.q, scale, None if qw.offset is None else -8 * scale, group, bits)


def fp8_channelwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale [out, 1]) with each row's largest value at FP8_MAX."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _stored(name: str, weight: torch.Tensor, method: str, scale_dtype: torch.dtype,
            group: int) -> dict[str, torch.Tensor]:
    """One linear weight's checkpoint tensors in the method's format."""
    prefix = name.removesuffix(".weight")
    if method == "fp8":
        w8, scale = fp8_channelwise(weight)
        return {name: w8, prefix + ".weight_scale": scale}
    qw = quantize_weight(weight, method, scale_dtype, group)
    if method == "int8":  # compressed-tensors stores q + 128, 4 to a word along the input
        codes = qw.q.to(torch.int32) + 128
        return {prefix + ".weight_packed": pack_int32(codes, 8, dim=1),
                prefix + ".weight_scale": qw.scale.to(scale_dtype),
                prefix + ".weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}
    zeros = torch.full((qw.scale.shape[1], qw.scale.shape[0]), 8, dtype=torch.int32)
    return {prefix + ".qweight": pack_int32(qw.q.t().to(torch.int32), 4, dim=1, slots=AWQ_SLOTS),
            prefix + ".qzeros": pack_int32(zeros, 4, dim=1, slots=AWQ_SLOTS),
            prefix + ".scales": qw.scale.t().to(torch.float16).contiguous()}


def quantization_config(method: str, skipped: list[str], group: int | None) -> dict:
    """config.json's quantization_config for the method; `skipped`: linear layers left dense."""
    if method == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": None, "modules_to_not_convert": skipped}
    if method == "int4-awq-format":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": skipped}
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
               "group_size": None, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": skipped,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None,
                                          "format": "pack-quantized"}}}


def _read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from pagedserve.executor.loader import checkpoint_files

    weights = {}
    for file in checkpoint_files(model_dir):
        with safe_open(file, framework="pt") as f:
            weights.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return weights


def quantize_model(model_dir: str | Path, out_dir: str | Path, method: str) -> Path:
    """Write `out_dir`: model_dir's model with its decoder linear weights quantized by `method`."""
    if method not in METHODS:
        raise ValueError(f"method: must be one of {METHODS}, got {method!r}")
    model_dir, out = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{model_dir} is already quantized "
                         f"({config['quantization_config'].get('quant_method')})")
    weights = _read_weights(model_dir)
    linear = [n for n, t in weights.items() if is_quantized_linear(n, t)]
    if not linear:
        raise ValueError(f"{model_dir}: no decoder linear weights (*.layers.N.*_proj.weight) found")
    group = awq_group([tuple(weights[n].shape) for n in linear]) if method.startswith("int4") else 0
    scale_dtype = _DTYPES.get(str(config.get("torch_dtype") or config.get("dtype")), torch.float32)
    tensors = {}
    for name, tensor in weights.items():
        tensors.update(_stored(name, tensor, method, scale_dtype, group) if name in linear
                       else {name: tensor.contiguous()})
    skipped = sorted({n.removesuffix(".weight") for n, t in weights.items() if t.dim() == 2
                      and n not in linear and "embed" not in n})
    out.mkdir(parents=True, exist_ok=True)
    for file in model_dir.iterdir():  # tokenizer, generation config, chat template, ...
        if file.is_file() and file.name not in (*_WEIGHT_FILES, "config.json") \
                and file.suffix != ".safetensors":
            shutil.copy2(file, out / file.name)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = quantization_config(method, skipped, group or None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
