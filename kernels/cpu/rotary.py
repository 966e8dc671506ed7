"""Rotary embedding on the CPU through rotary.c, with kernels.reference's signature; gpt-j
pairing, other dtypes or layouts, and a missing compiler go to the reference."""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu.build import ptr, typed_function


def _heads_ok(t: torch.Tensor) -> bool:
    """[tokens, heads, head_dim] on the CPU with contiguous heads (rows may be further apart)."""
    return (t.device.type == "cpu" and t.dim() == 3 and t.stride(2) == 1
            and t.stride(1) == t.shape[2])


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
    fn = typed_function("rotary", "rotary_neox", q.dtype)
    if (fn is None or not is_neox or q.dtype != k.dtype or not _heads_ok(q) or not _heads_ok(k)
            or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous()
            or cos_sin_cache.device.type != "cpu"):
        reference.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
        return
    pos = positions.to(torch.int64).contiguous()
    for t in (q, k):
        fn(ptr(t), ctypes.c_int64(t.stride(0)), ctypes.c_int64(t.shape[0]), t.shape[1],
           t.shape[2], ptr(cos_sin_cache), cos_sin_cache.shape[1], ptr(pos))
