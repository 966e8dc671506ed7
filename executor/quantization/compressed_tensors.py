"""compressed-tensors checkpoints (quant_method "compressed-tensors", as llm-compressor writes
them). Each config group names the layers it targets ("Linear", or "re:<regex>" on the layer
name) and its weight scheme; layers in `ignore` stay dense.

    pack-quantized (W4A16, W8A16)  weight_packed int32 [out, ceil(in * bits / 32)]: each value
                                   q + 2^(bits-1) (q signed), packed along the input, lowest bits
                                   first; weight_scale [out, groups]; weight_shape [2];
                                   weight_zero_point (asymmetric) packed the same way along the
                                   output; weight_g_idx with act-order
    int-quantized                  weight int8 [out, in] holding q, scales as above
    float-quantized (FP8 W8A8)     weight float8 [out, in]; weight_scale per tensor or channel
                                   (fp8.py: int8 where exact, else dense); input_scale dropped

w = (q - zero_point) * scale, per group of group_size inputs (strategy "group"), per row
("channel") or per tensor ("tensor").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pagedserve.executor.layers.quant_weights import ActOrderWeight
from pagedserve.executor.quantization.config import QuantSpec
from pagedserve.executor.quantization.fp8 import FP8_DTYPES, Fp8Counter, fp8_weight
from pagedserve.executor.quantization.gptq import act_order
from pagedserve.executor.quantization.packing import unpack_int32
from pagedserve.executor.quantization.parts import Format
from pagedserve.kernels.quantized import QuantizedWeight

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
_SUFFIXES = {".weight_packed": "packed", ".weight_scale": "scale", ".weight_shape": "shape",
             ".weight_zero_point": "zero_point", ".weight_g_idx": "g_idx",
             ".input_scale": "input_scale"}


@dataclass(frozen=True)
class Scheme:
    targets: tuple[str, ...]
    fmt: str
    bits: int
    kind: str  # "int" or "float"
    strategy: str  # "group", "channel", "tensor" or "block"
    group: int | None
    symmetric: bool
    block: tuple[int, int] | None

    def matches(self, layer: str) -> bool:
        return any(t == "Linear" or t == layer or layer.endswith("." + t)
                   or (t.startswith("re:") and re.match(t[3:], layer)) for t in self.targets)


def _scheme(name: str, group: dict, default_fmt: str | None) -> Scheme:
    weights = group.get("weights") or {}
    fmt = group.get("format") or default_fmt
    where = f"quantization_config.config_groups.{name}"
    if fmt not in FORMATS:
        raise ValueError(f"{where}: format {fmt!r} is not supported; supported: {FORMATS}")
    kind, bits = weights.get("type", "int"), weights.get("num_bits", 8)
    if (kind, bits) not in (("int", 4), ("int", 8), ("float", 8)):
        raise ValueError(f"{where}.weights: {kind} {bits}-bit weights are not supported "
                         "(int 4 or 8 bits, float 8 bits)")
    strategy = weights.get("strategy", "tensor")
    if strategy not in ("group", "channel", "tensor", "block"):
        raise ValueError(f"{where}.weights.strategy: {strategy!r} is not supported")
    block = weights.get("block_structure")
    return Scheme(tuple(group.get("targets") or ()), fmt, bits, kind, strategy,
                  weights.get("group_size"), bool(weights.get("symmetric", True)),
                  tuple(block) if block else None)


def read_schemes(spec: QuantSpec) -> tuple[list[Scheme], tuple[str, ...]]:
    groups = spec.get("config_groups") or {}
    if not groups:
        raise spec.field_error("config_groups", "names no quantized layers")
    default_fmt = spec.get("format")
    schemes = [_scheme(name, g, default_fmt) for name, g in groups.items()]
    return schemes, tuple(spec.get("ignore") or ())


def _zero_points(parts: dict, s: Scheme, shape: tuple[int, int], groups: int) -> torch.Tensor:
    zp = parts["zero_point"]
    if zp.dtype == torch.int32 and s.strategy in ("group", "channel"):  # packed along the output
        zp = unpack_int32(zp, s.bits, dim=0)[: shape[0]] - (1 << (s.bits - 1))
    return zp.to(torch.float32).reshape(-1, groups).expand(shape[0], groups)


def int_weight(parts: dict, s: Scheme) -> QuantizedWeight:
    """pack-quantized or int-quantized parts -> the shared form."""
    half = 1 << (s.bits - 1)
    if "packed" in parts:
        shape = tuple(int(n) for n in parts["shape"].tolist())
        codes = unpack_int32(parts["packed"], s.bits, dim=1)[:, : shape[1]]  # q + half
    else:
        codes = parts["weight"].to(torch.int32) + half
        shape = tuple(codes.shape)
    out_features, in_features = shape
    group = {"group": s.group, "channel": in_features, "tensor": in_features}.get(s.strategy)
    if not group or in_features % group:
        raise ValueError(f"{s.strategy} strategy with group_size {s.group} does not divide the "
                         f"{in_features} inputs")
    groups = in_features // group
    scale = parts["scale"].to(torch.float32).reshape(-1, groups).expand(out_features, groups)
    zp = None if s.symmetric else _zero_points(parts, s, shape, groups)
    if s.bits == 4:  # the stored code q + 8 is the shared form's: w = s code - s (8 + zp)
        q, offset = codes.to(torch.uint8), -(half + (0 if zp is None else zp)) * scale
    else:
        q, offset = (codes - half).to(torch.int8), None if zp is None else -zp * scale
    perm = None if "g_idx" not in parts else act_order(parts["g_idx"], group, in_features)
    q, scale = q.contiguous(), scale.contiguous()
    offset = None if offset is None else offset.contiguous()
    if perm is None:
        return QuantizedWeight(q, scale, offset, group, s.bits)
    return ActOrderWeight(q.index_select(1, perm).contiguous(), scale, offset, group, s.bits,
                          input_perm=perm)


class CompressedTensors:
    """The Format for one checkpoint: which scheme each layer has, and its conversion."""

    def __init__(self, spec: QuantSpec):
        self.schemes, self.ignore = read_schemes(spec)
        self.fp8 = Fp8Counter()

    def scheme(self, prefix: str) -> Scheme:
        found = next((s for s in self.schemes if s.matches(prefix)), None)
        if found is None:
            raise ValueError(f"no config group targets layer {prefix!r}, yet it is quantized")
        return found

    def claim(self, name: str, tensor: torch.Tensor) -> tuple[str, str] | None:
        for suffix, role in _SUFFIXES.items():
            if name.endswith(suffix):
                return name[: -len(suffix)], role
        if name.endswith(".weight") and (tensor.dtype in FP8_DTYPES or tensor.dtype == torch.int8):
            return name[: -len(".weight")], "weight"
        return None

    def required(self, prefix: str) -> frozenset[str]:
        s = self.scheme(prefix)
        roles = {"scale"} | ({"packed", "shape"} if s.fmt == "pack-quantized" else {"weight"})
        return frozenset(roles | (set() if s.symmetric or s.kind == "float" else {"zero_point"}))

    def convert(self, prefix: str, parts: dict) -> QuantizedWeight | torch.Tensor:
        s = self.scheme(prefix)
        if s.kind == "float":
            block = s.block if s.strategy == "block" else None
            return self.fp8(fp8_weight(parts["weight"], parts["scale"], block))
        return int_weight(parts, s)


def compressed_tensors_format(spec: QuantSpec) -> Format:
    ct = CompressedTensors(spec)
    return Format("compressed-tensors", ct.claim, ct.required, ct.convert)
