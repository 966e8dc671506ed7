"""Which kernels run: Triton on CUDA; on the CPU, the reference kernels with decode attention in C
(kernels/cpu, built on first use; the reference does everything where no compiler is found).

PAGEDSERVE_ATTENTION_BACKEND=triton|reference|cpu forces one; with TRITON_INTERPRET=1 set before
the process starts, `triton` runs the Triton kernels on the CPU through the interpreter.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

BACKENDS = {"reference": "pagedserve.kernels.reference", "triton": "pagedserve.kernels.triton", "cpu": "pagedserve.kernels.cpu"}
ENV_VAR = "PAGEDSERVE_ATTENTION_BACKEND"
log = logging.getLogger(__name__)


def backend_name(device: torch.device) -> str:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return "triton" if device.type == "cuda" else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}: unknown backend {name!r}; choose from {sorted(BACKENDS)}")
    return name


def select_backend(device: torch.device) -> ModuleType:
    """A module exposing paged_attention, write_kv, rms_norm, fused_add_rms_norm,
    rotary_embedding and silu_and_mul with the signatures of kernels.reference."""
    module = importlib.import_module(BACKENDS[backend_name(device)])
    if module.__name__ == "pagedserve.kernels.cpu":
        built, why = module.available()
        if not built:
            log.warning("CPU attention kernel not built (%s): using the reference kernels", why)
    return module
