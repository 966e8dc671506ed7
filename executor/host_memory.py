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
import sys

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
