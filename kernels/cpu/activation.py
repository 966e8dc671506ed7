"""SiLU-and-mul on the CPU through activation.c, with kernels.reference's signature; other
dtypes, layouts or devices and a missing compiler go to the reference."""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu.build import ptr, typed_function


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    fn = typed_function("activation", "silu_and_mul", x.dtype)
    if fn is None or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
        return reference.silu_and_mul(x)
    d = x.shape[1] // 2
    out = torch.empty((x.shape[0], d), dtype=x.dtype)
    fn(ptr(x), ctypes.c_int64(x.stride(0)), ptr(out), ctypes.c_int64(x.shape[0]), d)
    return out
