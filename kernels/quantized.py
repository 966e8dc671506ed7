"""The one form a quantized weight takes between its checkpoint format and a kernel.

Every format this engine reads (AWQ, GPTQ, compressed-tensors, GGUF's Q types, our own
`pagedserve quantize`) is converted at load into a QuantizedWeight: integer codes, one per element,
and per-group float scales and offsets, with

    w[o, i] = scale[o, i // group] * q[o, i] + offset[o, i // group]     (offset None: 0)

A zero-point format (AWQ, GPTQ: w = (q - z) * s) has offset = -z * s; llama.cpp's Q4_1 (w = d q + m)
has offset = m. Each kernel backend then packs this form its own way (`pack_quantized`) and
multiplies through its packing (`quant_linear`); kernels.reference's pair dequantizes and runs
F.linear, the specification the others are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODE_DTYPES = {4: torch.uint8, 8: torch.int8}  # bits -> dtype of q
CODE_RANGES = {4: (0, 15), 8: (-128, 127)}


@dataclass(frozen=True)
class QuantizedWeight:
    q: torch.Tensor  # [out, in] codes: uint8 in 0..15 (bits 4) or int8 (bits 8), unpacked
    scale: torch.Tensor  # [out, in // group] float32
    offset: torch.Tensor | None  # [out, in // group] float32, or None for a symmetric format
    group: int  # consecutive inputs of a row that share one scale (and offset); divides `in`
    bits: int  # 4 or 8

    def __post_init__(self) -> None:
        if self.bits not in CODE_DTYPES:
            raise ValueError(f"bits: {self.bits} is not supported (4 or 8)")
        if self.q.dim() != 2 or self.q.dtype != CODE_DTYPES[self.bits]:
            raise ValueError(f"q: expected a 2-D {CODE_DTYPES[self.bits]} tensor for {self.bits} "
                             f"bits, got {self.q.dtype} of shape {tuple(self.q.shape)}")
        out_features, in_features = self.q.shape
        if self.group <= 0 or in_features % self.group:
            raise ValueError(f"group: {self.group} does not divide the {in_features} inputs")
        groups = (out_features, in_features // self.group)
        for name in ("scale", "offset"):
            t = getattr(self, name)
            if t is None and name == "offset":
                continue
            if t.dtype != torch.float32 or tuple(t.shape) != groups:
                raise ValueError(f"{name}: expected float32 of shape {groups}, got {t.dtype} of "
                                 f"shape {tuple(t.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] weight, computed in float32 and rounded once to dtype."""
        scale = self.scale.repeat_interleave(self.group, dim=1)
        w = self.q.to(torch.float32) * scale
        if self.offset is not None:
            w += self.offset.repeat_interleave(self.group, dim=1)
        return w.to(dtype)

    def check_codes(self) -> None:
        """Every code within its bit width (a loader's bug otherwise); a ValueError naming q."""
        lo, hi = CODE_RANGES[self.bits]
        if self.q.numel() and (int(self.q.min()) < lo or int(self.q.max()) > hi):
            raise ValueError(f"q: codes outside {lo}..{hi} for {self.bits} bits")


def quantize_rtn(weight: torch.Tensor, bits: int, group: int,
                 symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest quantization of a dense [out, in] weight, per group of `group` inputs:
    symmetric (scale = max|w| / (2^(bits-1) - 1), codes centred on 0 for 8 bits or on 8 for 4) or
    asymmetric (min..max mapped onto the whole code range)."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"group: {group} does not divide the {in_features} inputs")
    w = weight.detach().to(torch.float32).reshape(out_features, in_features // group, group)
    lo, hi = CODE_RANGES[bits]
    if symmetric:
        half = (hi - lo) // 2  # 127 for 8 bits, 7 for 4
        scale = w.abs().amax(dim=2).clamp_min(1e-12) / half
        centre = 0 if bits == 8 else 8
        q = (w / scale[..., None]).round().clamp(-half, half) + centre
        offset = None if centre == 0 else -centre * scale
    else:
        w_min, w_max = w.amin(dim=2), w.amax(dim=2)
        scale = ((w_max - w_min) / (hi - lo)).clamp_min(1e-12)
        base = w_min - lo * scale  # the value of code 0
        q = ((w - base[..., None]) / scale[..., None]).round().clamp(lo, hi)
        offset = base
    codes = q.reshape(out_features, in_features).to(CODE_DTYPES[bits])
    return QuantizedWeight(codes, scale.contiguous(), None if offset is None
                           else offset.contiguous(), group, bits)
