"""bf16 GEMMs with float32 FMAs on AVX-512 CPUs where vdpbf16ps is the slower instruction
(panel_gemm512.c says why: an Intel Xeon without AMX). `preferred()` is the probe that decides;
`pack` gives a bf16 weight's paired panels once, `linear` multiplies a bf16 x through them."""

from __future__ import annotations

import ctypes
import hashlib
import os
from functools import cache
from pathlib import Path

import torch

from pagedserve.kernels.cpu.build import cache_dir, cpu_flags, cpu_identity, load, omp_threads, ptr

PANEL = 32  # outputs per panel, as in panel_gemm512.c
# Extra compiler flags of the build in use: empty in the engine; tests set ("-mno-avx512f",) to
# check that a CPU without AVX-512 builds the file and never takes the path
BUILD_FLAGS: tuple[str, ...] = ()
# float32 FMAs must do this many times vdpbf16ps's work per cycle to take the GEMMs: the path
# widens each weight with two more instructions per 32, and oneDNN's kernels are well tuned
MARGIN = 1.3


def _lib() -> ctypes.CDLL | None:
    lib = load("panel_gemm512", BUILD_FLAGS)[0]
    if lib is not None:
        lib.panel_gemm512_fma_gflops.restype = ctypes.c_double
        lib.panel_gemm512_dpbf16_gflops.restype = ctypes.c_double
    return lib


def available() -> bool:
    lib = _lib()
    return lib is not None and bool(lib.panel_gemm512_available())


def _has_amx() -> bool:
    """The CPU lists AMX's bf16 tiles, which oneDNN's bf16 GEMMs use where they exist, far ahead
    of both vdpbf16ps and float32 FMAs."""
    return "amx_bf16" in cpu_flags()


def _decision_file() -> Path:
    """Where this CPU's answer is kept (the kernel cache, keyed by the CPU like its libraries)."""
    ident = hashlib.sha256(cpu_identity().encode()).hexdigest()[:16]
    return cache_dir() / f"panel_gemm512-preferred-{ident}"


def _probe() -> bool:
    lib = _lib()
    fma = max(lib.panel_gemm512_fma_gflops() for _ in range(3))
    dpbf16 = max(lib.panel_gemm512_dpbf16_gflops() for _ in range(3))
    return dpbf16 > 0 and fma >= MARGIN * dpbf16


@cache
def preferred() -> bool:
    """True where this path beats vdpbf16ps: both instructions' rates measured on this core,
    best of three (a millisecond each), on a CPU without AMX. A CPU without AVX512_BF16 runs the
    engine in float32 and never asks. The first process on a machine probes and records the
    answer; later ones (an executor restarted, another rank) read it, so a co-tenant's noise
    during one probe cannot give two processes different GEMMs, and a recomputed request the
    other bits (batch invariance). Removing the file asks again."""
    if not available() or _has_amx():
        return False
    record = _decision_file()
    try:
        return record.read_text().strip() == "1"
    except OSError:
        pass
    choice = _probe()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}")
        tmp.write_text("1" if choice else "0")
        os.replace(tmp, record)  # atomic: a concurrent reader sees one answer or none
    except OSError:
        pass  # a read-only cache: this process keeps its own answer
    return choice


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [n, k] bf16 -> paired panels [ceil(n / 32), k, 32] bf16: element [p, kk, 2 j + h]
    is weight[32 p + 16 h + j, kk] (zero past n). None where the kernel does not run."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not available():
        return None
    n, k = weight.shape
    panels = (n + PANEL - 1) // PANEL
    padded = torch.zeros(panels * PANEL, k, dtype=torch.bfloat16)
    padded[:n] = weight.detach()
    return padded.view(panels, 2, 16, k).permute(0, 3, 2, 1).contiguous().view(panels, k, PANEL)


def linear(x: torch.Tensor, panels: torch.Tensor, out_features: int,
           bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) in bf16 for x [m, k] bf16, each output summed in float32 and
    rounded to bf16 once."""
    if x.stride(1) != 1:
        x = x.contiguous()
    bias_f = None if bias is None else bias.float().contiguous()
    m, k = x.shape
    out = torch.empty(m, out_features, dtype=torch.bfloat16)
    args = (ptr(panels), None if bias_f is None else ptr(bias_f), ptr(out), ctypes.c_int64(m),
            ctypes.c_int64(out_features), ctypes.c_int64(k), omp_threads())
    if x.dtype != torch.bfloat16:  # the tile broadcasts float32 values: x as it is
        xf = x.float()
        _lib().panel_gemm512_bf16(ptr(xf), ctypes.c_int64(xf.stride(0)), *args)
    elif _lib().panel_gemm512_bf16_x(ptr(x), ctypes.c_int64(x.stride(0)), *args):  # widened in C
        raise MemoryError("panel_gemm512 could not allocate x's float32 copy")
    return out
