"""The kernels compile for sm_90 even where no GPU is (see gpu_compile.py): a subprocess, since
this process imported them for the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[2]


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run")
@pytest.mark.skipif(not _has_cuda_backend(), reason="this triton has no CUDA backend")
def test_kernels_compile_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
