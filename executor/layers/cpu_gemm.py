"""Weights pre-packed for the CPU's GEMMs: oneDNN's blocked layout, or panel_gemm's panels.

F.linear on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call; at
the few dozen rows of a decode step that reorder is a large share of the multiply, so weights are
packed once at load (bit-identical results). float32 F.linear goes through another GEMM library,
slower than oneDNN with packed weights at all but the smallest row counts. A probe checks each
weight before its packed form is used: bf16 must match F.linear bit for bit (a rounding flip there
is a whole bf16 ulp), float32 within what reordering the same sums can change.

On CPUs with AVX2 but no AVX-512 a float32 weight takes kernels/cpu/panel_gemm's panels instead,
at every row count: oneDNN streams a decode step's weights well below memory speed there, and at
prompt sizes, where both are bound by the FMA units, the panels' 6 x 16 tile is faster too. The
panels share work out dynamically, so a thread the OS preempts does not hold its partner at the
end. A weight in panels keeps no oneDNN copy.

A bf16 weight on an AVX-512 CPU whose vdpbf16ps is slower than its float32 FMAs (an Intel Xeon
with AMX hidden) takes kernels/cpu/panel_gemm512's paired panels: float32 FMAs on the widened
weights, 1.4-1.7x oneDNN's bf16 GEMMs there from 16 rows. Its sums are float32 ones rounded to
bf16 once, so they may differ from oneDNN's by a bf16 rounding; the probe holds them to that.
The figures, with machines and dates: docs/benchmarks.md, "CPU GEMM paths".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels.cpu import panel_gemm, panel_gemm512


@dataclass
class PackedWeight:
    onednn: torch.Tensor | None  # oneDNN's blocked layout, where panels are not used
    panels: torch.Tensor | None  # panel_gemm's layout on AVX2-only CPUs (float32, or bf16 when
    # every value is one: see panel_gemm.pack)
    out_features: int
    pairs: torch.Tensor | None = None  # panel_gemm512's bf16 layout, where it is preferred


def _ops_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) through the packed weight; x is [rows, in_features]."""
    if packed.panels is not None:
        return panel_gemm.linear(x, packed.panels, packed.out_features, bias)
    if packed.pairs is not None:
        return panel_gemm512.linear(x, packed.pairs, packed.out_features, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.onednn, bias, "none", [], "")


def _agrees(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> bool:
    """bf16: F.linear's bits. float32: within 2 K u of the sum of |terms| (u = 2^-24), the bound
    on what summing K products in another order can change."""
    want = F.linear(x, weight, bias)
    if x.dtype != torch.float32:
        return torch.equal(got, want)
    return bool(((got - want).abs() <= _reorder_bound(x, weight, bias)).all())


def _reorder_bound(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """K 2^-23 times the sum of |terms|: the most that summing K float32 products in another
    order can move each output (u = 2^-24 per rounding, two sums each within K u)."""
    size = F.linear(x.abs(), weight.abs(), None if bias is None else bias.abs())
    return x.shape[1] * 2.0**-23 * size


def _rounds_like_float32(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> bool:
    """bf16 summed in float32 and rounded once: within the float32 reordering bound plus half a
    bf16 ulp (at most 2^-8 relative) of the exact product."""
    x64, w64, b64 = x.double(), weight.double(), None if bias is None else bias.double()
    exact = F.linear(x64, w64, b64)
    bound = _reorder_bound(x64, w64, b64) + 2.0**-8 * exact.abs()
    return bool(((got.double() - exact).abs() <= bound * (1 + 2.0**-7)).all())


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight | None:
    """The packed form of a bf16 or float32 CPU weight [out, in]: panel_gemm's panels where that
    kernel runs and its probe agrees, else oneDNN's layout; None where neither is available or
    agrees with F.linear (then the caller keeps F.linear)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return None
    probe = torch.randn(5, weight.shape[1]).to(weight.dtype)
    if weight.dtype == torch.bfloat16 and panel_gemm512.preferred():
        pairs = panel_gemm512.pack(weight)
        if _rounds_like_float32(panel_gemm512.linear(probe, pairs, weight.shape[0], bias),
                                probe, weight, bias):
            return PackedWeight(None, None, weight.shape[0], pairs)
    panels = panel_gemm.pack(weight)
    if panels is not None and _agrees(panel_gemm.linear(probe, panels, weight.shape[0], bias),
                                      probe, weight, bias):
        return PackedWeight(None, panels, weight.shape[0])
    if not _ops_available():
        return None
    try:
        packed = PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight.detach()), None,
                              weight.shape[0])
        if not _agrees(packed_linear(probe, packed, bias), probe, weight, bias):
            return None
    except RuntimeError:
        return None
    return packed


def shape_only(param: nn.Parameter) -> nn.Parameter:
    """What a layer keeps of a weight whose packed form serves every call: its shape and dtype on
    the meta device (no memory), with its loader attributes (which refuse to fill it: see
    check_loadable)."""
    kept = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                        requires_grad=False)
    for name in ("weight_loader", "shard_ids"):
        if hasattr(param, name):
            setattr(kept, name, getattr(param, name))
    return kept


def check_loadable(dst: torch.Tensor) -> None:
    """A loader's first step: a weight already moved into its packed form cannot be filled."""
    if dst.is_meta:
        raise ValueError("the weight is already packed for the CPU; weights load before packing")


def pack_for_cpu(model: nn.Module) -> int:
    """Packs every layer that offers `pack_for_cpu()` (the linear family, the LM head); returns
    how many took the packed form."""
    return sum(bool(m.pack_for_cpu()) for m in model.modules() if hasattr(m, "pack_for_cpu"))
