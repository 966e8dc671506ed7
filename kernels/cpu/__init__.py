"""The CPU backend: decode attention and rotary embedding in C (built on first use by
kernels/cpu/build.py); everything else, and every fallback, from kernels.reference."""

from kernels.cpu.attention import available, paged_attention
from kernels.cpu.rotary import rotary_embedding
from kernels.reference import fused_add_rms_norm, rms_norm, silu_and_mul, write_kv

__all__ = [
    "available", "fused_add_rms_norm", "paged_attention", "rms_norm", "rotary_embedding",
    "silu_and_mul", "write_kv",
]
