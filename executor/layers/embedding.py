"""Token embedding and LM head, split over the vocabulary for tensor parallelism.

Rank r holds rows [r * per_rank, (r + 1) * per_rank) of the vocabulary (per_rank = ceil(V / N); rows
past V are zero padding). At TP size 1 these are F.embedding and F.linear.

A quantized checkpoint may give either as a QuantizedWeight. The embedding is then dequantized at
load (a gather reads a few rows; it gains nothing from codes), but keeps this rank's codes on the
parameter (`param.quantized`) for an LM head tied to it, which runs quantized from them; an untied
LM head given a QuantizedWeight runs quantized too (finish_quantized, as the linear layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.executor.batch_invariance import at_least_rows
from pagedserve.executor.layers.cpu_gemm import (
    PackedWeight,
    check_loadable,
    pack_weight,
    packed_linear,
    shape_only,
)
from pagedserve.executor.layers.linear import new_param
from pagedserve.executor.layers.quant_weights import (
    cat_rows,
    input_perm,
    narrow_rows,
    release_storage,
)
from pagedserve.executor.parallel_state import all_gather, all_reduce
from pagedserve.executor.parallel_state import resolve as resolve_tp
from pagedserve.kernels.quantized import QuantizedWeight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int | None = None,
                 tp_size: int | None = None):
        super().__init__()
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)  # this process's (parallel_state.py)
        self.num_embeddings, self.tp_rank, self.tp_size = num_embeddings, tp_rank, tp_size
        self.per_rank = -(-num_embeddings // tp_size)
        self.start = tp_rank * self.per_rank
        self.weight = new_param(self.per_rank, embedding_dim)
        self.weight.weight_loader = self.weight_loader
        self.weight.shard_ids = (None,)
        self.weight.quantizable = True

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        check_loadable(param)
        expected = (self.num_embeddings, param.shape[1])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
        if isinstance(loaded, QuantizedWeight):
            self._load_quantized(param, loaded)
            return
        rows = loaded[self.start : self.start + self.per_rank]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0] :].zero_()

    def _load_quantized(self, param: nn.Parameter, loaded: QuantizedWeight) -> None:
        """This rank's rows of codes (zero rows past V) kept on the parameter; an embedding also
        fills its dense weight with them, dequantized."""
        if input_perm(loaded) is not None:
            raise ValueError("act-order (desc_act) weights are not supported for an embedding "
                             "or LM head")
        mine = max(0, min(self.per_rank, self.num_embeddings - self.start))
        param.quantized = cat_rows([narrow_rows(loaded, self.start, mine)], self.per_rank - mine)
        if isinstance(self, ParallelLMHead):  # an untied head needs no dense copy
            release_storage(param)
        else:
            param.data.copy_(param.quantized.dequantize(param.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids outside this rank's rows look up row 0 and are zeroed; the all-reduce fills them in.
        mine = (input_ids >= self.start) & (input_ids < self.start + self.per_rank)
        out = F.embedding((input_ids - self.start) * mine, self.weight) * mine[:, None]
        all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [N, d] -> logits [N, V]; may share its weight with the embedding (tied: the model
    sets `tied`)."""

    packed: PackedWeight | None = None  # set by pack_for_cpu once the weight is loaded
    tied: bool = False
    quant = None  # the backend's packed quantized weight, set by finish_quantized
    quant_backend = None
    min_rows = 1

    def finish_quantized(self, backend) -> bool:
        """Pack the codes the weight was loaded from (this head's, or the tied embedding's) for
        `backend`; an untied head's dense weight becomes a shape."""
        qw = getattr(self.weight, "quantized", None)
        if qw is None:
            return False
        self.quant, self.quant_backend = backend.pack_quantized(qw), backend
        if not self.tied:
            self.weight = shape_only(self.weight)
        return True

    def pack_for_cpu(self) -> bool:
        """Move the loaded weight into the CPU GEMM's packed layout (see cpu_gemm); a tied weight
        stays, as the embedding's."""
        if self.quant is not None:  # already packed, by the quantized kernels
            return False
        self.packed = pack_weight(self.weight)
        if self.packed is not None and not self.tied:
            self.weight = shape_only(self.weight)
        return self.packed is not None

    def row_product(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits for hidden [N, d], through whichever form the weight is in."""
        if self.quant is not None:
            return self.quant_backend.quant_linear(hidden, self.quant, None)
        if self.packed is not None:  # hidden is [N, d]: the packed GEMM takes matrices
            return packed_linear(hidden, self.packed, None)
        return F.linear(hidden, self.weight)

    def product_key(self) -> tuple[str, int, int]:
        kind = "quantized" if self.quant is not None else "packed" if self.packed is not None else "dense"
        return kind, self.weight.shape[1], self.per_rank

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # min_rows: fewer rows are padded to this many (executor/batch_invariance.py)
        logits = at_least_rows(self.row_product, hidden, self.min_rows)
        if self.tp_size > 1:
            logits = torch.cat(all_gather(logits), dim=-1)
        return logits[:, : self.num_embeddings]
