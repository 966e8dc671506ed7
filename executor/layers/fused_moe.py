"""A mixture-of-experts MLP: a router picks each token's top-k experts, and the experts run as one
fused call (the backend's `fused_experts`: a grouped GEMM by expert, never a loop over tokens).

The experts' weights are stacked, w13 [E, 2I, H] ([gate | up] rows of each expert) and
w2 [E, H, I], and filled per checkpoint tensor: shard (e, 0) is expert e's gate, (e, 1) its up,
and e its down projection. On the CPU each expert's slices are packed once for the CPU GEMM, as
the linear layers' weights are (layers/cpu_gemm.py): at a decode step's few rows per expert an
unpacked bf16 GEMM spends most of its time re-laying the weight out.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pagedserve.executor.layers.cpu_gemm import (
    PackedWeight,
    check_loadable,
    pack_weight,
    packed_linear,
    shape_only,
)
from pagedserve.executor.layers.linear import new_param
from pagedserve.kernels.cpu.moe import grouped_experts


def route(logits: torch.Tensor, top_k: int, renormalize: bool,
          weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] in weights_dtype, expert ids [T, K]).

    As Mixtral and Qwen3-MoE compute it: softmax over all experts in float32, the top k, then
    (renormalize) divided by their sum, which equals a softmax over the top-k logits alone."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights.to(weights_dtype), ids


class FusedMoE(nn.Module):
    """The experts: x [T, H] with routing (weights, ids) [T, K] -> [T, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 backend: ModuleType):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13_weight = new_param(num_experts, 2 * intermediate_size, hidden_size)
        self.w2_weight = new_param(num_experts, hidden_size, intermediate_size)
        self.w13_weight.weight_loader = self.weight_loader
        self.w13_weight.shard_ids = tuple((e, j) for e in range(num_experts) for j in (0, 1))
        self.w2_weight.weight_loader = self.weight_loader
        self.w2_weight.shard_ids = tuple(range(num_experts))
        for p in (self.w13_weight, self.w2_weight):  # the model's load_weights says so
            p.quant_refusal = ("MoE expert weights cannot run quantized yet (the fused experts "
                               "take dense weights)")
        self.backend = backend
        self.packed: list[tuple[PackedWeight, PackedWeight]] | None = None  # pack_for_cpu

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        """One expert's checkpoint matrix into its slice of the stacked weight."""
        check_loadable(param)
        if param is self.w13_weight:
            expert, half = shard_id
            dst = param.data[expert].narrow(0, half * self.intermediate_size,
                                            self.intermediate_size)
        else:
            dst = param.data[shard_id]
        if loaded.shape != dst.shape:
            raise ValueError(f"expected shape {tuple(dst.shape)}, got {tuple(loaded.shape)}")
        dst.copy_(loaded)

    def pack_for_cpu(self) -> bool:
        """Each expert's gate/up and down weights in the CPU GEMM's packed layout, the stacked
        originals then only shapes (see LinearBase.pack_for_cpu); all experts or none."""
        packed = [(pack_weight(self.w13_weight[e]), pack_weight(self.w2_weight[e]))
                  for e in range(self.num_experts)]
        if any(a is None or b is None for a, b in packed):
            return False
        self.packed = packed
        self.w13_weight, self.w2_weight = shape_only(self.w13_weight), shape_only(self.w2_weight)
        return True

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self.backend.fused_experts(x, self.w13_weight, self.w2_weight, topk_weights,
                                              topk_ids)
        packed = self.packed
        return grouped_experts(x, lambda e, rows: packed_linear(rows, packed[e][0], None),
                               lambda e, rows: packed_linear(rows, packed[e][1], None),
                               topk_weights, topk_ids, self.num_experts)
