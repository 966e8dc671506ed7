"""The contract every kernel backend meets: kernels.reference (the specification), kernels.cpu
and kernels.triton each export these names with the reference's signatures, so the executor's
layers call whichever was chosen (executor/backend.py) without knowing which."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from pagedserve.kernels.quantized import QuantizedWeight


@runtime_checkable
class KernelBackend(Protocol):
    def available(self) -> tuple[bool, str]:
        """Whether this backend's own kernels run here, and why not (then it falls back to the
        reference's, or cannot run at all)."""
        ...

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, out: torch.Tensor, *, scale: float,
                        max_seqlen_q: int, max_seqlen_k: int, sliding_window: int = 0,
                        softcap: float = 0.0, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> torch.Tensor:
        """The cache may be narrower than q (bf16, or fp8 e4m3 whose stored values are read back
        times k_scale / v_scale); scores and accumulation are float32."""
        ...

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, *, k_scale: float = 1.0,
                 v_scale: float = 1.0) -> None:
        """Converts to the cache's dtype: fp8 stores x / scale saturated to +-448, rounded to
        nearest even (kernels/reference/kv_write.py)."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def fused_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rotary_embedding(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None: ...

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    def fused_experts(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor: ...

    def pack_quantized(self, weight: QuantizedWeight) -> Any:
        """A quantized weight (kernels/quantized.py) in this backend's own layout, once at load."""
        ...

    def quant_linear(self, x: torch.Tensor, packed: Any,
                     bias: torch.Tensor | None) -> torch.Tensor: ...


KERNEL_NAMES = ("paged_attention", "write_kv", "rms_norm", "fused_add_rms_norm",
                "rotary_embedding", "silu_and_mul", "gelu_tanh_and_mul", "fused_experts",
                "pack_quantized", "quant_linear")
