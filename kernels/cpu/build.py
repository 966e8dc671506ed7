"""Compile kernels/cpu/*.c (with the shared *.h) for this CPU on first use and load them through ctypes.

The library is built with the machine's C compiler (-O3 -march=native) into a cache directory
keyed by the sources, the flags and the CPU, so a second process or run loads it in milliseconds and
a different CPU never loads a library built for another. No compiler, or a failed build, gives
None and the reason (callers fall back to the reference kernels).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11",
         # lets gcc vectorise float reductions; infinities and NaN keep their meaning
         "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
ENV_DISABLE = "PAGEDSERVE_DISABLE_CPU_KERNELS"
# These split their work over OpenMP threads, torch's own pool (see paged_decode.c); a compiler
# without OpenMP builds them without the flag, and they run on the calling thread alone
LIBRARY_FLAGS = {name: ("-fopenmp",) for name in ("paged_decode", "activation", "panel_gemm",
                                                      "panel_gemm512", "quant_gemm")}


def cache_dir() -> Path:
    root = os.environ.get("PAGEDSERVE_CACHE") or Path.home() / ".cache" / "pagedserve"
    return Path(root) / "kernels"


@cache
def _cpuinfo() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def cpu_field(name: str) -> str:
    """The first CPU's /proc/cpuinfo value of `name` ("model name", "flags"), "" if none."""
    return next((ln.split(":", 1)[1].strip() for ln in _cpuinfo()
                 if ln.split(":", 1)[0].strip() == name and ":" in ln), "")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as lscpu lists them (avx2, avx512_bf16, amx_bf16, ...)."""
    return frozenset(cpu_field("flags").split())


def cpu_identity() -> str:
    """The machine and CPU as the kernel cache keys them (model name and flags)."""
    return f"{platform.machine()}\n{cpu_field('model name')}\n{cpu_field('flags')}"


def _compile(source: Path, target: Path, compiler: str, flags: list[str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, f"-I{SOURCE_DIR}", str(source), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent process sees no half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def load(name: str, extra_flags: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not) for kernels/cpu/<name>.c. `extra_flags` (say
    "-mno-avx512f") build another variant beside the default one: tests use them to run each
    SIMD path on a CPU that would pick a wider one."""
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0"):
        return None, f"{ENV_DISABLE} is set"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or gcc) on PATH"
    flags = [*FLAGS, *extra_flags]
    lib, why = _build_and_load(name, compiler, [*flags, *LIBRARY_FLAGS.get(name, ())])
    if lib is None and name in LIBRARY_FLAGS:
        lib, _ = _build_and_load(name, compiler, flags)
    return lib, "" if lib is not None else why


def _build_and_load(name: str, compiler: str, flags: list[str]) -> tuple[ctypes.CDLL | None, str]:
    source = SOURCE_DIR / f"{name}.c"
    headers = [h.read_text() for h in sorted(SOURCE_DIR.glob("*.h"))]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, *flags, compiler,
                                     cpu_identity()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    try:
        if not target.exists():
            _compile(source, target, compiler, flags)
        return ctypes.CDLL(str(target)), ""
    except subprocess.CalledProcessError as e:
        return None, f"{compiler} failed on {source.name}: {e.stderr.strip()[:500]}"
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building {source.name} failed: {e}"


_SUFFIX = {"torch.float32": "f32", "torch.bfloat16": "bf16"}


def typed_function(name: str, symbol: str, dtype) -> ctypes._CFuncPtr | None:
    """`<symbol>_f32` or `<symbol>_bf16` of library `name` for a torch dtype; None when the
    library is not built or the dtype has no variant (callers use the reference then)."""
    lib, _ = load(name)
    suffix = _SUFFIX.get(str(dtype))
    return None if lib is None or suffix is None else getattr(lib, f"{symbol}_{suffix}")


def ptr(tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


@cache
def _cpu_count() -> int:
    return os.cpu_count() or 1  # 7 us a call (it reads /sys): once per process, not per kernel


def omp_threads() -> int:
    """Threads for the OpenMP kernels: torch's own count, never more than the CPUs."""
    import torch

    return max(1, min(torch.get_num_threads(), _cpu_count()))
