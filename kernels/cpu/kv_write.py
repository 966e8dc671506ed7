"""KV writes on the CPU through kv_write.c, with kernels.reference's signature; mixed dtypes,
other layouts or devices and a missing compiler go to the reference."""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu.build import load, ptr


def _rows_ok(t: torch.Tensor, cache: torch.Tensor) -> bool:
    """[tokens, kv_heads, head_dim] on the CPU, a token's heads one contiguous stretch, in the
    cache's dtype and head shape."""
    return (t.device.type == "cpu" and t.dim() == 3 and t.dtype == cache.dtype
            and t.shape[1:] == cache.shape[2:] and t.stride(2) == 1 and t.stride(1) == t.shape[2])


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    lib, _ = load("kv_write")
    if (lib is None or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or k_cache.shape != v_cache.shape or not _rows_ok(key, k_cache)
            or not _rows_ok(value, k_cache) or key.shape[0] != slot_mapping.shape[0]
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()):
        reference.write_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    row = k_cache.shape[2] * k_cache.shape[3]
    bad = lib.write_kv(ptr(key), ctypes.c_int64(key.stride(0)), ptr(value),
                       ctypes.c_int64(value.stride(0)), ptr(k_cache), ptr(v_cache),
                       ptr(slot_mapping), ctypes.c_int64(key.shape[0]), ctypes.c_int64(row),
                       ctypes.c_int64(k_cache.element_size()),
                       ctypes.c_int64(k_cache.shape[0] * k_cache.shape[1]))
    if bad >= 0:
        raise IndexError(f"slot_mapping[{bad}] = {int(slot_mapping[bad])} is outside the cache's "
                         f"{k_cache.shape[0] * k_cache.shape[1]} slots")
