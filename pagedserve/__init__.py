"""pagedserve: an LLM serving engine with a paged KV cache and continuous batching."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The parts (router, scheduler, executor, kernels, protos, bench) are imported only as
# pagedserve.<part>. A wheel installs them inside this package (pyproject's package-dir); a source
# checkout (and an editable install of it) keeps them at the repository root, so there this
# package's search path takes in the root too. The root folders have no __init__.py, so a process
# started there never shadows a PyPI package of the same name (Hugging Face's `kernels`).
PARTS = ("router", "scheduler", "executor", "kernels", "protos", "bench")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "router")) and os.path.isdir(
        os.path.join(_ROOT, "router")):
    __path__.append(_ROOT)
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from pagedserve.llm import LLM
    from pagedserve.outputs import CompletionOutput, RequestOutput
    from pagedserve.sampling_params import SamplingParams


def __getattr__(name: str):
    # Imported lazily so that `pagedserve --help` and the router stay light.
    if name == "LLM":
        from pagedserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pagedserve.sampling_params import SamplingParams

        return SamplingParams
    if name in ("CompletionOutput", "RequestOutput"):
        from pagedserve import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
