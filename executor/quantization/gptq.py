"""GPTQ checkpoints (quant_method "gptq": AutoGPTQ, GPTQModel, optimum), 4 and 8 bits:
w = (q - z) * s per group of inputs.

    qweight  int32 [in * bits / 32, out]   packed along the input, lowest bits first
    qzeros   int32 [groups, out * bits / 32]  packed along the output
    scales   fp16  [groups, out]
    g_idx    int32 [in]                    the group of each input (optional)

Zero points: checkpoint_format "gptq" (v1, the historic default) stores z - 1, so z is the stored
value + 1; "gptq_v2" stores z itself. Symmetric checkpoints store z = 2^(bits-1) the same way.

Act-order (desc_act): g_idx is not [0]*group + [1]*group + ..., so a group's inputs are scattered.
The input columns are then reordered once at load so that each group's are consecutive, and the
layer gathers x's columns in the same order at run time (layers/quant_weights.ActOrderWeight):
supported, except where a row-parallel layer would split the reordered inputs across ranks.
"""

from __future__ import annotations

import torch

from pagedserve.executor.layers.quant_weights import ActOrderWeight
from pagedserve.executor.quantization.config import QuantSpec
from pagedserve.executor.quantization.packing import unpack_int32
from pagedserve.executor.quantization.parts import Format, suffix_claim
from pagedserve.kernels.quantized import QuantizedWeight

PARTS = {".qweight": "qweight", ".qzeros": "qzeros", ".scales": "scales", ".g_idx": "g_idx"}
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def check_spec(spec: QuantSpec) -> tuple[int, int, bool, bool]:
    """(bits, group size or -1, zeros stored minus one, desc_act), refusing what is not read."""
    bits = spec.get("bits", 4)
    if bits not in (4, 8):
        raise spec.field_error("bits", "is not supported: 4- and 8-bit GPTQ only")
    group = spec.get("group_size", 128)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise spec.field_error("group_size", "must be a positive integer or -1 (one group)")
    if spec.get("is_marlin_format"):
        raise spec.field_error("is_marlin_format", "is not supported: Marlin's repacked layout")
    fmt = spec.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise spec.field_error("checkpoint_format", f"is not supported; expected one of "
                                                    f"{CHECKPOINT_FORMATS}")
    return bits, group, fmt == "gptq", bool(spec.get("desc_act", False))


def act_order(g_idx: torch.Tensor, group: int, in_features: int) -> torch.Tensor | None:
    """None when the inputs' groups are already consecutive; else the input order that makes
    them so (each group must hold exactly `group` inputs)."""
    g_idx = g_idx.to(torch.int64)
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx: expected shape ({in_features},), got {tuple(g_idx.shape)}")
    if torch.equal(g_idx, torch.arange(in_features, device=g_idx.device) // group):
        return None
    counts = torch.bincount(g_idx, minlength=in_features // group)
    if counts.numel() != in_features // group or bool((counts != group).any()):
        raise ValueError(f"g_idx: every group must hold {group} inputs")
    return torch.argsort(g_idx, stable=True)


def to_quantized(parts: dict[str, torch.Tensor], bits: int, group: int,
                 zeros_minus_one: bool) -> QuantizedWeight:
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    per = 32 // bits
    in_features, out_features = qweight.shape[0] * per, qweight.shape[1]
    group = in_features if group == -1 else group
    if in_features % group:
        raise ValueError(f"group_size {group} does not divide the {in_features} inputs")
    groups = in_features // group
    if tuple(scales.shape) != (groups, out_features):
        raise ValueError(f"scales: expected shape {(groups, out_features)}, got "
                         f"{tuple(scales.shape)}")
    if tuple(qzeros.shape) != (groups, out_features // per):
        raise ValueError(f"qzeros: expected shape {(groups, out_features // per)}, got "
                         f"{tuple(qzeros.shape)}")
    codes = unpack_int32(qweight, bits, dim=0).t()
    zeros = unpack_int32(qzeros, bits, dim=1).t().to(torch.float32) + int(zeros_minus_one)
    scale = scales.t().to(torch.float32).contiguous()
    perm = None if "g_idx" not in parts else act_order(parts["g_idx"], group, in_features)
    if perm is not None:
        codes = codes.index_select(1, perm)
    if bits == 4:  # codes 0..15 as they are; w = s q - s z
        q, offset = codes.to(torch.uint8), -zeros * scale
    else:  # codes 0..255 centred on 128 for int8: w = s (q - 128) + s (128 - z)
        q, offset = (codes - 128).to(torch.int8), (128 - zeros) * scale
        offset = None if bool((zeros == 128).all()) else offset
    offset = None if offset is None else offset.contiguous()
    if perm is None:
        return QuantizedWeight(q.contiguous(), scale, offset, group, bits)
    return ActOrderWeight(q.contiguous(), scale, offset, group, bits, input_perm=perm)


def gptq_format(spec: QuantSpec) -> Format:
    bits, group, minus_one, desc_act = check_spec(spec)
    required = frozenset({"qweight", "qzeros", "scales"} | ({"g_idx"} if desc_act else set()))
    return Format("gptq", suffix_claim(PARTS), lambda prefix: required,
                  lambda prefix, p: to_quantized(p, bits, group, minus_one))
