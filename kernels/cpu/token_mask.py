"""Token masks applied to logits on the CPU through token_mask.c; the caller keeps a torch path
(executor/structured.py) for other dtypes, devices and a missing compiler."""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from pagedserve.kernels.cpu.build import load, ptr


def forbid_rows(logits: torch.Tensor, rows: list[int], words: np.ndarray) -> bool:
    """For each r in rows, logits[r] := -inf wherever bit i of words[r] (int32 words, 32 tokens
    each; a row per logits row) is 0, in place; False, untouched, where the kernel cannot take
    them (then the caller masks)."""
    lib, _ = load("token_mask")
    if (lib is None or logits.device.type != "cpu" or logits.dtype != torch.float32
            or logits.dim() != 2 or logits.stride(1) != 1 or words.dtype != np.int32
            or words.ndim != 2 or not words.flags["C_CONTIGUOUS"] or len(words) != logits.shape[0]
            or words.shape[1] * 32 < logits.shape[1]):
        return False
    if not all(0 <= r < logits.shape[0] for r in rows):
        raise IndexError(f"rows {rows} outside the logits' {logits.shape[0]}")
    index = np.ascontiguousarray(rows, dtype=np.int64)
    lib.forbid_rows_f32(ptr(logits), ctypes.c_int64(logits.stride(0)),
                        ctypes.c_void_p(index.ctypes.data), ctypes.c_int64(len(rows)),
                        ctypes.c_void_p(words.ctypes.data), ctypes.c_int64(words.shape[1]),
                        ctypes.c_int64(logits.shape[1]))
    return True
