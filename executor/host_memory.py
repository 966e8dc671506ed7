"""Keep freed host memory in the process instead of handing it back to the OS.

A CPU step allocates and frees tens of megabytes of temporaries (gathered K/V, activations). glibc
serves large allocations with fresh mmap()s and trims the heap after frees, so every step pays a
page fault per 4 KiB it touches, which on the benchmark machine cost as much as the arithmetic.
Raising the mmap and trim thresholds makes the heap keep and reuse that memory (the process holds
its peak working set, as a caching allocator would).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys

import torch

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30
_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; False where there is no glibc (nothing done)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return _applied


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose memory the kernel is asked to back with 2 MiB pages.

    Paged attention reads K/V pages scattered over the whole cache; with 4 KiB pages nearly every
    page it touches is a TLB miss (docs/benchmarks.md, "CPU GEMM paths", has the gain). Where
    transparent huge pages are off or madvise fails this is plain memory, same results.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % _HUGE_PAGE
    if sys.platform.startswith("linux") and nbytes >= _HUGE_PAGE:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise(raw.data_ptr() + offset, nbytes - nbytes % _HUGE_PAGE, _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
    return raw[offset:offset + nbytes].view(dtype).view(shape).zero_()
