"""Triton kernels, each a drop-in for its twin in kernels.reference (same names, same
signatures). Set TRITON_INTERPRET=1 before importing this package to run them on the CPU."""

from kernels.triton.activation import silu_and_mul
from kernels.triton.attention import paged_attention
from kernels.triton.kv_write import write_kv
from kernels.triton.norm import fused_add_rms_norm, rms_norm
from kernels.triton.rotary import rotary_embedding

__all__ = [
    "fused_add_rms_norm", "paged_attention", "rms_norm", "rotary_embedding", "silu_and_mul",
    "write_kv",
]
