"""The CPU backend: the reference kernels, with decode attention in C where a compiler built it."""

from kernels.cpu.attention import available, paged_attention
from kernels.reference import (
    fused_add_rms_norm,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
    write_kv,
)

__all__ = [
    "available", "fused_add_rms_norm", "paged_attention", "rms_norm", "rotary_embedding",
    "silu_and_mul", "write_kv",
]
