"""Triton kernels, each a drop-in for its twin in kernels.reference (same names, same
signatures). Set TRITON_INTERPRET=1 before importing this package to run them on the CPU."""

from pagedserve.kernels.triton.activation import gelu_tanh_and_mul, silu_and_mul
from pagedserve.kernels.triton.attention import paged_attention
from pagedserve.kernels.triton.kv_write import write_kv
from pagedserve.kernels.triton.moe import fused_experts
from pagedserve.kernels.triton.norm import fused_add_rms_norm, rms_norm
from pagedserve.kernels.triton.precompile import warmup as warmup
from pagedserve.kernels.triton.quant_linear import pack_quantized, quant_linear
from pagedserve.kernels.triton.rotary import rotary_embedding
from pagedserve.kernels.triton.runtime import available

# warmup (compile the attention variants at start-up) is Triton-only: not in __all__, which
# lists the API shared with kernels.reference.
__all__ = [
    "available", "fused_add_rms_norm", "fused_experts", "gelu_tanh_and_mul",
    "pack_quantized", "paged_attention", "quant_linear", "rms_norm", "rotary_embedding", "silu_and_mul",
    "write_kv",
]
