"""Paged attention as a layer: store this step's K/V in the cache, then attend over the pages."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pagedserve.executor.attention_metadata import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int,
        backend: ModuleType,
        softcap: float = 0.0,
    ):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.sliding_window, self.softcap, self.backend = sliding_window, softcap, backend
        # what a stored fp8 K / V is multiplied by when read (1.0 for other cache dtypes); the
        # executor sets them from its KV cache (executor/kv_cache.py)
        self.k_scale = self.v_scale = 1.0

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,  # [T, heads or kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """-> [T, num_heads * head_dim]. K/V are written first: a prompt's queries attend to keys
        of the same step, and they reach the kernel only through the cache."""
        self.backend.write_kv(k, v, k_cache, v_cache, attn.slot_mapping, k_scale=self.k_scale,
                              v_scale=self.v_scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        self.backend.paged_attention(
            q,
            k_cache,
            v_cache,
            attn.cu_seqlens_q,
            attn.seq_lens,
            attn.block_tables,
            out,
            scale=self.scale,
            max_seqlen_q=attn.max_seqlen_q,
            max_seqlen_k=attn.max_seqlen_k,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return out.view(q.shape[0], self.num_heads * self.head_dim)
