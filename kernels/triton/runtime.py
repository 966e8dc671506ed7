"""Facts every launcher needs: are we interpreting, and small shape helpers.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, i.e. when these modules are
imported; INTERPRETING records the same moment, so a launcher and its kernels always agree.
"""

from __future__ import annotations

import os

import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot runs on fp32 operands with IEEE precision.

    fp32 inputs: always (tl.dot would otherwise round them to tf32 on the GPU). Under the
    interpreter: always, because its bf16 tl.dot is wrong (see /work/shared/NOTES.md).
    """
    return INTERPRETING or dtype == torch.float32


def check_device(*tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU ones."""
    if INTERPRETING:
        return
    for t in tensors:
        if not t.is_cuda:
            raise ValueError(
                "kernels.triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
                f"got a tensor on {t.device}"
            )


def available() -> tuple[bool, str]:
    """Compiled kernels need a CUDA device; the interpreter runs them on the CPU."""
    if INTERPRETING or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device, and TRITON_INTERPRET=1 was not set before import"
