"""Rotary position embedding applied in place to q and k.

cos_sin_cache[pos] holds [cos(pos * f_0..f_{r/2-1}) | sin(same)] for a rotary dimension r
(r <= head_dim; the rest of each head passes through). Two layouts pair the dimensions:
  neox  (Llama, Mistral, Qwen): dimension j pairs with j + r/2 (rotate_half)
  gpt-j (interleaved):          dimension 2j pairs with 2j + 1
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x [T, H, r], cos/sin [T, 1, r/2] -> rotated x, computed in float32."""
    xf = x.float()
    if is_neox:
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32
    is_neox: bool = True,
) -> None:
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    for t in (q, k):
        t[..., :rot] = _rotate(t[..., :rot], cos, sin, is_neox).to(t.dtype)
