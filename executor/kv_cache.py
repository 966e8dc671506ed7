"""The paged KV cache: per layer, one pool of K pages and one of V pages.

Layout [num_blocks, block_size, num_kv_heads, head_dim]. Token slot
s = block_id * block_size + offset is row s of the pool viewed as [num_blocks * block_size, num_kv_heads, head_dim].

The pool's dtype (`--kv-cache-dtype`) may be narrower than the model's: bfloat16 under a float32
model, or fp8 (float8_e4m3fn) with a per-tensor scale per layer for K and for V (stored = value /
scale, saturated to +-448). The kernels convert on write and upcast to float32 on read; a
narrower pool holds proportionally more tokens in the same bytes.
"""

from __future__ import annotations

import torch

from pagedserve.executor.config import kv_cache_dtype_name
from pagedserve.executor.host_memory import zeros_on_huge_pages


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's torch dtype: the model's for auto."""
    return {"auto": model_dtype, "bfloat16": torch.bfloat16,
            "fp8": torch.float8_e4m3fn}[kv_cache_dtype_name(name)]


def check_block_size(block_size: int) -> None:
    """Kernels tile pages by block_size, so it must be a power of two in [8, 128]."""
    if not (8 <= block_size <= 128 and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two in [8, 128], got {block_size}")


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        k_scales: list[float] | None = None,
        v_scales: list[float] | None = None,
    ) -> None:
        """k_scales / v_scales: per layer, what a stored value is multiplied by when read (fp8;
        1.0 when the checkpoint carries none)."""
        check_block_size(block_size)
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Zeros, not empty: padded block-table entries point at block 0, and a kernel that reads a
        # masked-out page must see finite numbers (0 * NaN would poison the softmax-weighted sum).
        self.k = [self._zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [self._zeros(shape, dtype, device) for _ in range(num_layers)]
        self.k_scale = list(k_scales) if k_scales is not None else [1.0] * num_layers
        self.v_scale = list(v_scales) if v_scales is not None else [1.0] * num_layers
        if not len(self.k_scale) == len(self.v_scale) == num_layers:
            raise ValueError(f"k_scales / v_scales: need {num_layers} per-layer scales")
        if any(not (x > 0 and x != float("inf")) for x in self.k_scale + self.v_scale):
            raise ValueError("k_scales / v_scales: must be positive and finite")

    @staticmethod
    def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        if torch.device(device).type == "cpu":
            return zeros_on_huge_pages(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Memory one block takes across all layers, K and V: what capacity planning divides by."""
        check_block_size(block_size)
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element
