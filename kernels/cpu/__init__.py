"""The CPU backend: decode attention, RMSNorm, rotary embedding, SiLU-and-mul and KV writes in C
(built on first use by kernels/cpu/build.py); prompt attention and every fallback from
kernels.reference."""

from kernels.cpu.activation import silu_and_mul
from kernels.cpu.attention import available, paged_attention
from kernels.cpu.kv_write import write_kv
from kernels.cpu.norm import fused_add_rms_norm, rms_norm
from kernels.cpu.rotary import rotary_embedding

__all__ = [
    "available", "fused_add_rms_norm", "paged_attention", "rms_norm", "rotary_embedding",
    "silu_and_mul", "write_kv",
]
