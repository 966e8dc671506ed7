"""The CPU backend: decode attention, RMSNorm and rotary embedding in C (built on first use by
kernels/cpu/build.py); prompt attention, SiLU-and-mul, KV writes and every fallback from
kernels.reference (a C SiLU-and-mul measured no faster than torch's two-thread one)."""

from kernels.cpu.attention import available, paged_attention
from kernels.cpu.norm import fused_add_rms_norm, rms_norm
from kernels.cpu.rotary import rotary_embedding
from kernels.reference import silu_and_mul, write_kv

__all__ = [
    "available", "fused_add_rms_norm", "paged_attention", "rms_norm", "rotary_embedding",
    "silu_and_mul", "write_kv",
]
