"""RMSNorm and fused add + RMSNorm on the CPU through norm.c, with kernels.reference's
signatures; other dtypes, layouts or devices and a missing compiler go to the reference."""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu.build import ptr, typed_function


def _matrix_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """[rows, hidden] on the CPU with contiguous rows, and a matching contiguous weight."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.stride(1) == 1
            and weight.dtype == x.dtype and weight.is_contiguous()
            and weight.shape == (x.shape[1],))


def _heads_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x [tokens, heads, head_dim], heads contiguous within a token (a view into fused qkv rows)."""
    return (x.device.type == "cpu" and x.dim() == 3 and x.stride(2) == 1
            and x.stride(1) == x.shape[2] and weight.dtype == x.dtype and weight.is_contiguous()
            and weight.shape == (x.shape[2],))


def _rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    fn = typed_function("norm", "rms_norm_heads", x.dtype)
    if fn is None or not _heads_ok(x, weight):
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    fn(ptr(x), ctypes.c_int64(x.stride(0)), ptr(weight), ptr(out),
       ctypes.c_int64(x.shape[1] * x.shape[2]), ctypes.c_int64(x.shape[0]), x.shape[1],
       x.shape[2], ctypes.c_float(eps))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() == 3:  # per head (Qwen3's q/k norm)
        out = _rms_norm_heads(x, weight, eps)
        return out if out is not None else reference.rms_norm(x, weight, eps)
    fn = typed_function("norm", "rms_norm", x.dtype)
    if fn is None or not _matrix_ok(x, weight):
        return reference.rms_norm(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype)
    fn(ptr(x), ctypes.c_int64(x.stride(0)), ptr(weight), ptr(out), ctypes.c_int64(x.shape[0]),
       x.shape[1], ctypes.c_float(eps))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    fn = typed_function("norm", "add_rms_norm", x.dtype)
    if (fn is None or not _matrix_ok(x, weight) or not x.is_contiguous()
            or not residual.is_contiguous() or residual.shape != x.shape
            or residual.dtype != x.dtype):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype)
    fn(ptr(x), ptr(residual), ptr(weight), ptr(out), ctypes.c_int64(x.shape[0]), x.shape[1],
       ctypes.c_float(eps))
    return out, residual
