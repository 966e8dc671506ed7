"""Mixture-of-experts MLP on the CPU, grouped by expert; kernels.reference.moe is the
specification.

    pairs (token, slot) = T*K rows, sorted by expert:   e0 e0 e0 | e1 | e3 e3 ...   (e2: none)
    per non-empty expert: one GEMM over its contiguous rows (gate/up), SiLU-and-mul over all
    rows at once, one GEMM per expert again (down); rows weighted, put back in (token, slot)
    order, and the K slots of each token summed in float32.

Each expert's weights are read once per step whatever the number of its tokens, and no Python
runs per token. Summing the slots in (token, slot) order keeps the reference's order of addition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagedserve.kernels.cpu.activation import silu_and_mul


def group_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """(pair index p = t*K + k of each sorted row, rows per expert). Stable, so within an expert
    the rows keep token order."""
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host read
    return order, counts


# One expert's GEMM: (expert, rows [n, in]) -> rows @ W_expert.T [n, out]. The layer passes its
# weights packed for the CPU (executor/layers/fused_moe.py); fused_experts, plain slices.
ExpertGemm = Callable[[int, torch.Tensor], torch.Tensor]


def _grouped(rows: torch.Tensor, gemm: ExpertGemm, counts: list[int]) -> torch.Tensor:
    """rows [N, in] grouped by expert -> [N, out], one GEMM per non-empty expert."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(gemm(e, rows[start:start + n]))
            start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def grouped_experts(x: torch.Tensor, gate_up: ExpertGemm, down: ExpertGemm,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    num_experts: int) -> torch.Tensor:
    """fused_experts with each expert's two GEMMs given as functions."""
    tokens, k = topk_ids.shape
    if tokens == 0:
        return torch.empty_like(x)
    order, counts = group_by_expert(topk_ids, num_experts)
    act = silu_and_mul(_grouped(x[order // k], gate_up, counts))
    out = _grouped(act, down, counts).float()
    out *= topk_weights.reshape(-1, 1).float()[order]
    pairs = torch.empty_like(out)
    pairs[order] = out  # back to (token, slot) order
    return pairs.view(tokens, k, -1).sum(1).to(x.dtype)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights, topk_ids [T, K] -> [T, H]."""
    return grouped_experts(x, lambda e, rows: torch.mm(rows, w13[e].t()),
                           lambda e, rows: torch.mm(rows, w2[e].t()),
                           topk_weights, topk_ids, w13.shape[0])
