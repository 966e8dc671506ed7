"""The CPU backend: attention (every query row), RMSNorm, rotary embedding, SiLU-and-mul and KV
writes in C (built on first use by kernels/cpu/build.py); every fallback from kernels.reference."""

from pagedserve.kernels.cpu.activation import gelu_tanh_and_mul, silu_and_mul
from pagedserve.kernels.cpu.attention import available, paged_attention
from pagedserve.kernels.cpu.kv_write import write_kv
from pagedserve.kernels.cpu.moe import fused_experts
from pagedserve.kernels.cpu.norm import fused_add_rms_norm, rms_norm
from pagedserve.kernels.cpu.quant_linear import pack_quantized, quant_linear
from pagedserve.kernels.cpu.rotary import rotary_embedding

__all__ = [
    "available", "fused_add_rms_norm", "fused_experts", "gelu_tanh_and_mul",
    "pack_quantized", "paged_attention", "quant_linear", "rms_norm", "rotary_embedding",
    "silu_and_mul", "write_kv",
]
