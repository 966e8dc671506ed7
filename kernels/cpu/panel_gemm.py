"""float32 GEMMs through weight panels (panel_gemm.c), for CPUs with AVX2 but no AVX-512, where the
engine runs float32: faster than oneDNN there at every row count, most at decode sizes. `pack`
gives the weight's panel layout once; `linear` multiplies through it. A weight whose values are all
bf16 values (a bf16 checkpoint run in float32) is packed as bf16: exact, and half the bytes to
read."""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels.cpu.build import load, omp_threads, ptr

PANEL = 16  # outputs per panel, as in panel_gemm.c
# Extra compiler flags of the build in use. The engine leaves them empty (the C file has a path
# only where AVX-512 is absent); tests set ("-mno-avx512f",) to run the AVX2 path on an AVX-512
# CPU, which executes AVX2 code as well.
BUILD_FLAGS: tuple[str, ...] = ()


def _lib() -> ctypes.CDLL | None:
    return load("panel_gemm", BUILD_FLAGS)[0]


def available() -> bool:
    lib = _lib()
    return lib is not None and bool(lib.panel_gemm_available())


def pack(weight: torch.Tensor, allow_bf16: bool = True) -> torch.Tensor | None:
    """weight [n, k] float32 -> panels [ceil(n / 16), k, 16], bfloat16 when every value of the
    weight is one (and allow_bf16), else float32; None where the kernel is not used (another
    dtype or device, or a CPU it has no path for)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not available():
        return None
    n, k = weight.shape
    w = weight.detach().contiguous()
    narrow = w.to(torch.bfloat16) if allow_bf16 else None
    if narrow is not None and torch.equal(narrow.to(torch.float32), w):  # NaN: float32 panels
        panels = torch.empty((n + PANEL - 1) // PANEL, k, PANEL, dtype=torch.bfloat16)
        _lib().pack_panels_bf16(ptr(narrow), ctypes.c_int64(n),
                                               ctypes.c_int64(k), ptr(panels))
        return panels
    panels = torch.empty((n + PANEL - 1) // PANEL, k, PANEL)
    _lib().pack_panels_f32(ptr(w), ctypes.c_int64(n), ctypes.c_int64(k), ptr(panels))
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
    lib = _lib()
    gemm = lib.panel_gemm_f32_bf16_panels if panels.dtype == torch.bfloat16 else lib.panel_gemm_f32
    gemm(ptr(x), ctypes.c_int64(x.stride(0)), ptr(panels), None if bias is None else ptr(bias),
         ptr(out), ctypes.c_int64(m), ctypes.c_int64(out_features), ctypes.c_int64(k),
         omp_threads())
    return out
