"""The gated MLP's activations (SiLU-and-mul, GELU-tanh-and-mul) on the CPU through
activation.c, with kernels.reference's signatures; other dtypes, layouts or devices and a missing
compiler go to the reference."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from pagedserve.kernels import reference
from pagedserve.kernels.cpu.build import ptr, typed_function


def _act_and_mul(symbol: str, x: torch.Tensor,
                 fallback: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    fn = typed_function("activation", symbol, x.dtype)
    if fn is None or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
        return fallback(x)
    d = x.shape[1] // 2
    out = torch.empty((x.shape[0], d), dtype=x.dtype)
    fn(ptr(x), ctypes.c_int64(x.stride(0)), ptr(out), ctypes.c_int64(x.shape[0]), d)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul("silu_and_mul", x, reference.silu_and_mul)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul("gelu_tanh_and_mul", x, reference.gelu_tanh_and_mul)
