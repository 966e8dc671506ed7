"""AutoAWQ's GEMM layout (quant_method "awq", version "gemm"): 4-bit weights with a zero point
per group of `group_size` inputs, w = (q - z) * s.

    qweight  int32 [in, out / 8]           8 outputs per word, nibbles interleaved (packing.AWQ_SLOTS)
    qzeros   int32 [in / group, out / 8]   the same interleaving
    scales   fp16  [in / group, out]

Converted to the shared form: codes transposed to [out, in], offset = -z * s.
"""

from __future__ import annotations

import torch

from pagedserve.executor.quantization.config import QuantSpec
from pagedserve.executor.quantization.packing import AWQ_SLOTS, unpack_int32
from pagedserve.executor.quantization.parts import Format, suffix_claim
from pagedserve.kernels.quantized import QuantizedWeight

PARTS = {".qweight": "qweight", ".qzeros": "qzeros", ".scales": "scales"}


def check_spec(spec: QuantSpec) -> int:
    """The group size, after refusing what this reader does not read."""
    if spec.get("bits", spec.get("w_bit", 4)) != 4:
        raise spec.field_error("bits", "is not supported: AWQ GEMM checkpoints are 4-bit")
    version = str(spec.get("version", "gemm")).lower()
    if version != "gemm":
        raise spec.field_error("version", "is not supported: only AutoAWQ's GEMM layout is read")
    if not spec.get("zero_point", True):
        raise spec.field_error("zero_point", "is not supported (AWQ without zero points)")
    group = spec.get("group_size", spec.get("q_group_size", 128))
    if not isinstance(group, int) or group <= 0:
        raise spec.field_error("group_size", "must be a positive integer")
    return group


def to_quantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group: int) -> QuantizedWeight:
    """One layer's AWQ tensors -> the shared form, shapes checked against each other."""
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    if in_features % group:
        raise ValueError(f"group_size {group} does not divide the {in_features} inputs")
    groups = in_features // group
    if tuple(qzeros.shape) != (groups, out_features // 8):
        raise ValueError(f"qzeros: expected shape {(groups, out_features // 8)}, got "
                         f"{tuple(qzeros.shape)}")
    if tuple(scales.shape) != (groups, out_features):
        raise ValueError(f"scales: expected shape {(groups, out_features)}, got "
                         f"{tuple(scales.shape)}")
    q = unpack_int32(qweight, 4, dim=1, slots=AWQ_SLOTS).t().to(torch.uint8)
    zeros = unpack_int32(qzeros, 4, dim=1, slots=AWQ_SLOTS).t().to(torch.float32)
    scale = scales.t().to(torch.float32).contiguous()
    return QuantizedWeight(q.contiguous(), scale, (-zeros * scale).contiguous(), group, 4)


def awq_format(spec: QuantSpec) -> Format:
    group = check_spec(spec)
    return Format("awq", suffix_claim(PARTS), lambda prefix: frozenset(PARTS.values()),
                  lambda prefix, p: to_quantized(p["qweight"], p["qzeros"], p["scales"], group))
