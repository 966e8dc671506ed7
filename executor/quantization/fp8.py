"""FP8 weights (quant_method "fp8", and compressed-tensors' float-quantized): e4m3 (or e5m2)
values times a float32 scale that is per tensor, per output channel, or per block of
weight_block_size (128 x 128: DeepSeek-style `weight_scale_inv`).

    weight              float8 [out, in]
    weight_scale(_inv)  []/[1] per tensor | [out]/[out, 1] per channel | [ceil(out/bo), ceil(in/bi)]
    input_scale         static activation scale: dropped (activations stay in the compute dtype)

No kernel multiplies fp8 weights yet. A weight goes to the int8 form when that is exact: within
each group of inputs every value is an integer multiple of one power of two, at most 127 times
it (an fp8 value is m * 2^e with a 3-bit mantissa, so a group whose exponents span at most four
octaves qualifies). Otherwise (the usual case: weights spread over many octaves) it is
dequantized to a dense weight at load, and the reader says so in the log.
"""

from __future__ import annotations

import structlog
import torch

from pagedserve.executor.quantization.config import QuantSpec
from pagedserve.executor.quantization.parts import Format
from pagedserve.kernels.quantized import QuantizedWeight

log = structlog.get_logger("pagedserve.executor.quantization")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INT8_GROUPS = (128, 64, 32)  # tried in turn for the exact int8 form


def expand_scale(scale: torch.Tensor, shape: tuple[int, int],
                 block: tuple[int, int] | None) -> torch.Tensor:
    """The scale of every element, [out, in] float32."""
    out_features, in_features = shape
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1, 1).expand(out_features, in_features)
    if s.numel() == out_features and (s.dim() == 1 or tuple(s.shape) == (out_features, 1)):
        return s.reshape(out_features, 1).expand(out_features, in_features)
    if block is None:
        raise ValueError(f"weight scale of shape {tuple(s.shape)} is neither per tensor nor per "
                         f"channel, and no weight_block_size is given")
    bo, bi = block
    expected = (-(-out_features // bo), -(-in_features // bi))
    if tuple(s.shape) != expected:
        raise ValueError(f"block weight scale: expected shape {expected} for blocks {block}, "
                         f"got {tuple(s.shape)}")
    full = s.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)
    return full[:out_features, :in_features]


def exact_int8(values: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight | None:
    """values * scale (both [out, in] float32, values fp8-exact) as int8 codes with a scale per
    group, when that is exact; None otherwise."""
    out_features, in_features = values.shape
    for group in (g for g in INT8_GROUPS if in_features % g == 0):
        v = values.reshape(out_features, -1, group)
        s = scale.reshape(out_features, -1, group)
        if not bool((s == s[..., :1]).all()):
            continue  # a group straddles two scale blocks
        exponent = torch.frexp(v).exponent - 4  # an fp8 value's mantissa unit, at most
        exponent = torch.where(v == 0, torch.full_like(exponent, 127), exponent)
        lowest = exponent.amin(dim=-1)
        lowest = torch.where(lowest == 127, torch.zeros_like(lowest), lowest)  # all-zero groups
        unit = torch.ldexp(torch.ones_like(s[..., 0]), lowest)
        q = v / unit[..., None]
        if bool((q.abs() <= 127).all()) and bool((q == q.round()).all()):
            codes = q.reshape(out_features, in_features).to(torch.int8)
            return QuantizedWeight(codes, (unit * s[..., 0]).contiguous(), None, group, 8)
    return None


def fp8_weight(weight: torch.Tensor, scale: torch.Tensor,
               block: tuple[int, int] | None) -> QuantizedWeight | torch.Tensor:
    """One fp8 weight in the int8 form where exact, else dense float32."""
    if weight.dtype not in FP8_DTYPES or weight.dim() != 2:
        raise ValueError(f"expected a 2-D float8 weight, got {weight.dtype} of shape "
                         f"{tuple(weight.shape)}")
    values = weight.to(torch.float32)
    full = expand_scale(scale, tuple(weight.shape), block)
    return exact_int8(values, full) or values * full


class Fp8Counter:
    """Counts the layers each way, to say once in the log what happened to them."""

    def __init__(self) -> None:
        self.int8 = self.dense = 0

    def __call__(self, result: QuantizedWeight | torch.Tensor) -> QuantizedWeight | torch.Tensor:
        if isinstance(result, QuantizedWeight):
            self.int8 += 1
        else:
            self.dense += 1
            if self.dense == 1:
                log.info("fp8 weights dequantized to the compute dtype at load: no fp8 kernel "
                         "yet, and their int8 form is not exact")
        return result


def block_size(spec: QuantSpec, key: str = "weight_block_size") -> tuple[int, int] | None:
    block = spec.get(key)
    if block is None:
        return None
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise spec.field_error(key, "must be two positive integers")
    return tuple(block)


def claim(name: str, tensor: torch.Tensor) -> tuple[str, str] | None:
    for suffix, role in ((".weight_scale_inv", "scale"), (".weight_scale", "scale"),
                         (".input_scale", "input_scale")):
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    if name.endswith(".weight") and tensor.dtype in FP8_DTYPES:
        return name[: -len(".weight")], "weight"
    return None


def fp8_format(spec: QuantSpec) -> Format:
    fmt = str(spec.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "e5m2", "float8_e4m3fn"):
        raise spec.field_error("fmt", "is not supported (e4m3 or e5m2)")
    block, count = block_size(spec), Fp8Counter()
    return Format("fp8", claim, lambda prefix: frozenset({"weight", "scale"}),
                  lambda prefix, p: count(fp8_weight(p["weight"], p["scale"], block)))
