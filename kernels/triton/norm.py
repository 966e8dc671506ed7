"""RMSNorm, alone and fused with the residual add before it; kernels.reference.norm is the
specification. One program per row, the whole row in registers. Numerics follow transformers:
the sum of squares in fp32, the normalised row cast to the input dtype, then times the weight."""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from pagedserve.kernels.triton.runtime import check_device, next_pow2

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_row(r, w_ptr, out_ptr, cols, mask, eps, HIDDEN: tl.constexpr):
    """r: one row in its input dtype -> out row = weight * (r * rsqrt(mean(r^2) + eps)).to(r)."""
    rf = r.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(rf * rf, 0) / HIDDEN + eps)
    y = (rf * rstd).to(r.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    _rms_norm_row(x, w_ptr, out_ptr + row * stride_o, cols, mask, eps, HIDDEN)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
                               HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
    r = (res.to(tl.float32) + x).to(res.dtype)  # residual.add_(x): one rounding, residual dtype
    tl.store(res_ptr + row * stride_r + cols, r, mask=mask)
    _rms_norm_row(r, w_ptr, out_ptr + row * stride_o, cols, mask, eps, HIDDEN)


def _launch_args(hidden: int) -> dict:
    block = next_pow2(hidden)
    assert block <= MAX_HIDDEN, f"hidden size {hidden} above {MAX_HIDDEN}"
    return {"HIDDEN": hidden, "BLOCK": block, "num_warps": min(max(block // 256, 1), 16)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden] -> normalised in float32, cast back, then scaled (transformers' order)."""
    hidden = x.shape[-1]
    check_device(x, weight)
    x2 = x.reshape(-1, hidden)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight, out, x2.stride(0), hidden, float(eps), **_launch_args(hidden))
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; returns (rms_norm(residual), residual). residual is updated in place."""
    hidden = x.shape[-1]
    check_device(x, residual, weight)
    assert residual.shape == x.shape
    x2 = x.reshape(-1, hidden)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    r2 = residual.view(-1, hidden)  # a view, so the in-place update reaches the caller
    assert r2.stride(1) == 1
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, residual.dtype),
                      device=x.device)
    if x2.shape[0]:
        _fused_add_rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, x2.stride(0), r2.stride(0), hidden, float(eps),
            **_launch_args(hidden))
    return out, residual
