"""Which kernels run: Triton on CUDA; on the CPU, the reference kernels with attention and more in C
(kernels/cpu, built on first use; the reference does everything where no compiler is found).

PAGEDSERVE_ATTENTION_BACKEND=triton|reference|cpu forces one; with TRITON_INTERPRET=1 set before
the process starts, `triton` runs the Triton kernels on the CPU through the interpreter.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from pagedserve.kernels.backend import KernelBackend

BACKENDS = {"reference": "pagedserve.kernels.reference", "triton": "pagedserve.kernels.triton",
            "cpu": "pagedserve.kernels.cpu"}
ENV_VAR = "PAGEDSERVE_ATTENTION_BACKEND"
log = logging.getLogger(__name__)


def backend_name(device: torch.device) -> str:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return "triton" if device.type == "cuda" else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}: unknown backend {name!r}; choose from {sorted(BACKENDS)}")
    return name


def select_backend(device: torch.device) -> KernelBackend:
    """The chosen kernels module (a KernelBackend: kernels.reference's names and signatures)."""
    name = backend_name(device)
    module = importlib.import_module(BACKENDS[name])
    assert isinstance(module, KernelBackend), f"{module.__name__} misses a kernel"
    ok, why = module.available()
    if not ok and name == "cpu":  # its fallbacks are the reference kernels: it still runs
        log.warning("CPU kernels not built (%s): using the reference kernels", why)
    elif not ok:
        raise ValueError(f"{ENV_VAR}={name}: {why}")
    return module
