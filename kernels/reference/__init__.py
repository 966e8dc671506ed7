"""Plain-PyTorch kernels: the specification each Triton kernel is tested against, and the CPU path."""

from __future__ import annotations

from pagedserve.kernels.reference.activation import gelu_tanh_and_mul, silu_and_mul
from pagedserve.kernels.reference.attention import paged_attention
from pagedserve.kernels.reference.kv_write import write_kv
from pagedserve.kernels.reference.moe import fused_experts
from pagedserve.kernels.reference.norm import fused_add_rms_norm, rms_norm
from pagedserve.kernels.reference.quant_linear import pack_quantized, quant_linear
from pagedserve.kernels.reference.rotary import rotary_embedding


def available() -> tuple[bool, str]:
    """Plain PyTorch: runs wherever torch does."""
    return True, ""


__all__ = [
    "available", "fused_add_rms_norm", "fused_experts", "gelu_tanh_and_mul",
    "pack_quantized", "paged_attention", "quant_linear", "rms_norm", "rotary_embedding", "silu_and_mul",
    "write_kv",
]
