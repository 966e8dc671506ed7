"""float32 GEMMs of a few rows through small_gemm.c, for CPUs with AVX2 but no AVX-512 (where the
engine runs float32 and oneDNN streams the weights of a decode-sized GEMM slowly). `pack` gives
the weight's panel layout once; `linear` multiplies through it."""

from __future__ import annotations

import ctypes

import torch

from kernels.cpu.build import load, omp_threads, ptr

PANEL = 16  # outputs per panel, as in small_gemm.c


def available() -> bool:
    lib, _ = load("small_gemm")
    return lib is not None and bool(lib.small_gemm_available())


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [n, k] float32 -> panels [ceil(n / 16), k, 16], or None where the kernel is not
    used (another dtype or device, or a CPU it has no path for)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not available():
        return None
    n, k = weight.shape
    panels = torch.empty((n + PANEL - 1) // PANEL, k, PANEL)
    w = weight.detach().contiguous()
    load("small_gemm")[0].pack_panels_f32(ptr(w), ctypes.c_int64(n), ctypes.c_int64(k), ptr(panels))
    return panels


def linear(x: torch.Tensor, panels: torch.Tensor, out_features: int,
           bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [m, k] float32 through the weight's panels."""
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()  # held here: the C call gets only its address
    m, k = x.shape
    out = torch.empty(m, out_features)
    load("small_gemm")[0].small_gemm_f32(
        ptr(x), ctypes.c_int64(x.stride(0)), ptr(panels),
        None if bias is None else ptr(bias), ptr(out), ctypes.c_int64(m),
        ctypes.c_int64(out_features), ctypes.c_int64(k), omp_threads())
    return out
