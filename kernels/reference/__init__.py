"""Plain-PyTorch kernels: the specification each Triton kernel is tested against, and the CPU path."""

from kernels.reference.activation import silu_and_mul
from kernels.reference.attention import paged_attention
from kernels.reference.kv_write import write_kv
from kernels.reference.norm import fused_add_rms_norm, rms_norm
from kernels.reference.rotary import rotary_embedding

__all__ = [
    "fused_add_rms_norm", "paged_attention", "rms_norm", "rotary_embedding", "silu_and_mul",
    "write_kv",
]
