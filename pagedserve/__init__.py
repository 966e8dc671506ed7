"""pagedserve: an LLM serving engine with a paged KV cache and continuous batching."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
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
