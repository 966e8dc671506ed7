"""Mixture-of-experts MLP: each token through its top-k experts, the outputs mixed by the routing
weights. The specification the grouped CPU path and the Triton kernel are tested against.

Rounding, as transformers' experts do it at the activations' dtype: gate/up GEMM, SiLU-and-mul
and the down GEMM each round to x.dtype; the routing weights then multiply in float32 and the k
outputs sum in float32, rounded to x.dtype once at the end.
"""

from __future__ import annotations

import torch

from pagedserve.kernels.reference.activation import silu_and_mul


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] = [gate | up] rows per expert; w2 [E, H, I]; topk_weights and
    topk_ids [T, K] -> [T, H] in x.dtype:

        out[t] = sum_k topk_weights[t, k] * w2[e] @ silu_and_mul(w13[e] @ x[t]),  e = topk_ids[t, k]

    One token at a time, its K experts' weights gathered: plain and slow, the oracle."""
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        experts = topk_ids[t].long()
        gate_up = torch.bmm(w13[experts], x[t].expand(len(experts), -1).unsqueeze(-1))  # [K, 2I, 1]
        act = silu_and_mul(gate_up.squeeze(-1))  # [K, I]
        down = torch.bmm(w2[experts], act.unsqueeze(-1)).squeeze(-1)  # [K, H]
        out[t] = (down.float() * topk_weights[t].float()[:, None]).sum(0).to(x.dtype)
    return out
