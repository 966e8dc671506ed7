"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else on the CPU through the
Triton interpreter. TRITON_INTERPRET is read when a kernel module is imported, so it is set here,
at collection, and kernels.triton is imported only inside tests (the `tk` fixture)."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tk():
    """The kernels.triton package, imported after TRITON_INTERPRET is in place."""
    already = "pagedserve.kernels.triton.runtime" in sys.modules
    import pagedserve.kernels.triton as triton_kernels
    from pagedserve.kernels.triton.runtime import INTERPRETING

    if not torch.cuda.is_available() and not INTERPRETING:
        pytest.fail("kernels.triton was imported before TRITON_INTERPRET=1 was set "
                    f"(imported earlier in this process: {already}); set it in the environment")
    return triton_kernels


@pytest.fixture(autouse=True)
def kernel_seed() -> int:
    """Fresh random inputs every run; the seed is printed (shown on failure) and can be pinned
    with PAGEDSERVE_TEST_SEED to reproduce one."""
    seed = int(os.environ.get("PAGEDSERVE_TEST_SEED") or random.SystemRandom().randrange(2**31))
    torch.manual_seed(seed)
    print(f"kernel test seed {seed} (rerun with PAGEDSERVE_TEST_SEED={seed})")
    return seed
