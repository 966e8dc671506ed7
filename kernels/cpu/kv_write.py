"""KV writes on the CPU through kv_write.c, with kernels.reference's signature. Same dtype on
both sides: a copy; a narrower cache (float32 or bf16 K/V into bf16 or fp8): a converted copy.
Other dtypes, layouts or devices and a missing compiler go to the reference."""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu.build import load, ptr

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2}  # simd.h's KIND_*


def _rows_ok(t: torch.Tensor, cache: torch.Tensor) -> bool:
    """[tokens, kv_heads, head_dim] on the CPU, a token's heads one contiguous stretch, in a
    dtype the C side reads and the cache's head shape."""
    return (t.device.type == "cpu" and t.dim() == 3 and t.shape[1:] == cache.shape[2:]
            and t.stride(2) == 1 and t.stride(1) == t.shape[2] and _kinds_ok(t.dtype, cache.dtype))


def _kinds_ok(src: torch.dtype, cache: torch.dtype) -> bool:
    """The same dtype (a copy; fp8 K/V would need the scale applied), or a narrower cache the C
    side converts to: float32 -> bf16 / fp8, bf16 -> fp8."""
    if src == cache:
        return src != torch.float8_e4m3fn
    return KINDS.get(src, 9) < KINDS.get(cache, -1)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    lib, _ = load("kv_write")
    if (lib is None or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype
            or key.dtype != value.dtype or not _rows_ok(key, k_cache)
            or not _rows_ok(value, k_cache) or key.shape[0] != slot_mapping.shape[0]
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()):
        reference.write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale,
                           v_scale=v_scale)
        return
    row, num_slots = k_cache.shape[2] * k_cache.shape[3], k_cache.shape[0] * k_cache.shape[1]
    common = (ptr(key), ctypes.c_int64(key.stride(0)), ptr(value), ctypes.c_int64(value.stride(0)),
              ptr(k_cache), ptr(v_cache), ptr(slot_mapping), ctypes.c_int64(key.shape[0]),
              ctypes.c_int64(row))
    if key.dtype == k_cache.dtype:
        bad = lib.write_kv(*common, ctypes.c_int64(k_cache.element_size()),
                           ctypes.c_int64(num_slots))
    else:
        bad = lib.write_kv_convert(*common, KINDS[key.dtype], KINDS[k_cache.dtype],
                                   ctypes.c_float(k_scale), ctypes.c_float(v_scale),
                                   ctypes.c_int64(num_slots))
    if bad >= 0:
        raise IndexError(f"slot_mapping[{bad}] = {int(slot_mapping[bad])} is outside the cache's "
                         f"{k_cache.shape[0] * k_cache.shape[1]} slots")
