"""Token embedding and LM head, split over the vocabulary for tensor parallelism.

Rank r holds rows [r * per_rank, (r + 1) * per_rank) of the vocabulary (per_rank = ceil(V / N); rows
past V are zero padding). At TP size 1 these are F.embedding and F.linear.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pagedserve.executor.layers.cpu_gemm import (
    PackedWeight,
    check_loadable,
    pack_weight,
    packed_linear,
    shape_only,
)
from pagedserve.executor.layers.linear import new_param


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.num_embeddings, self.tp_rank, self.tp_size = num_embeddings, tp_rank, tp_size
        self.per_rank = -(-num_embeddings // tp_size)
        self.start = tp_rank * self.per_rank
        self.weight = new_param(self.per_rank, embedding_dim)
        self.weight.weight_loader = self.weight_loader
        self.weight.shard_ids = (None,)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        check_loadable(param)
        expected = (self.num_embeddings, param.shape[1])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
        rows = loaded[self.start : self.start + self.per_rank]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids outside this rank's rows look up row 0 and are zeroed; the all-reduce fills them in.
        mine = (input_ids >= self.start) & (input_ids < self.start + self.per_rank)
        out = F.embedding((input_ids - self.start) * mine, self.weight) * mine[:, None]
        dist.all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [N, d] -> logits [N, V]; may share its weight with the embedding (tied: the model
    sets `tied`)."""

    packed: PackedWeight | None = None  # set by pack_for_cpu once the weight is loaded
    tied: bool = False

    def pack_for_cpu(self) -> bool:
        """Move the loaded weight into the CPU GEMM's packed layout (see cpu_gemm); a tied weight
        stays, as the embedding's."""
        self.packed = pack_weight(self.weight)
        if self.packed is not None and not self.tied:
            self.weight = shape_only(self.weight)
        return self.packed is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:  # hidden is [N, d]: the packed GEMM takes matrices
            logits = packed_linear(hidden, self.packed, None)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[:, : self.num_embeddings]
