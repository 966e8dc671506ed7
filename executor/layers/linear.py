"""Linear layers: the one place that decides how a weight is stored, sharded, loaded and applied.

At tensor-parallel size 1 each layer is a plain F.linear. With TP size N over ranks 0..N-1:

    ColumnParallelLinear  y[:, rank's 1/N of outputs] = x @ W_rank.T     no communication
    RowParallelLinear     y = all_reduce(x[:, rank's 1/N of inputs] @ W_rank.T) (+ bias once)

so a column-parallel layer feeding a row-parallel one (qkv -> attention -> o_proj, gate_up -> down)
costs one all-reduce. Each parameter carries `weight_loader(param, loaded, shard_id)`, which takes a
full checkpoint tensor, checks its shape, and copies in this rank's part; quantized formats and LoRA
plug in here, and model code never touches a weight's storage. A quantized weight (a
QuantizedWeight in place of the tensor) is sliced the same way, kept until all its shards arrived,
and packed once for the kernel backend by finish_quantized (layers/quant_weights.py).
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
from pagedserve.executor.layers.quant_weights import (
    cat_rows,
    check_compatible,
    check_not_mixed,
    check_same_perm,
    input_perm,
    narrow_inputs,
    narrow_rows,
    owned,
    release_storage,
)
from pagedserve.executor.parallel_state import all_reduce
from pagedserve.executor.parallel_state import resolve as resolve_tp
from pagedserve.kernels.quantized import QuantizedWeight


def new_param(*shape: int) -> nn.Parameter:
    """Uninitialised storage for a weight the loader fills (every one is checked to be loaded)."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def copy_shard(
    dst: torch.Tensor, loaded: torch.Tensor, dim: int | None, rank: int, size: int
) -> None:
    """dst <- part `rank` of `size` equal parts of `loaded` along `dim` (dim None: all of it).
    The full tensor's shape is checked first, so a wrong checkpoint never loads half-right."""
    check_loadable(dst)
    expected = list(dst.shape)
    if dim is not None:
        expected[dim] *= size
    if list(loaded.shape) != expected:
        raise ValueError(f"expected shape {tuple(expected)}, got {tuple(loaded.shape)}")
    if dim is not None and size > 1:
        loaded = loaded.narrow(dim, rank * dst.shape[dim], dst.shape[dim])
    dst.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    copy_shard(param.data, loaded, None, 0, 1)


def _attach(param: nn.Parameter | None, loader, shard_ids: tuple = (None,)) -> None:
    """Give a parameter its loader and the checkpoint shards that must all arrive to fill it."""
    if param is not None:
        param.weight_loader = loader
        param.shard_ids = shard_ids


def _divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {tp_size}")
    return n // tp_size


class LinearBase(nn.Module):
    """y = x @ weight.T + bias, with weight [output_size, input_size] as this rank stores it."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.input_size, self.output_size = input_size, output_size
        self.weight = new_param(output_size, input_size)
        self.bias = new_param(output_size) if bias else None
        for p in (self.weight, self.bias):
            _attach(p, self.weight_loader)
        self.weight.quantizable = True  # the model's load_weights refuses a QuantizedWeight else
        self.packed: PackedWeight | None = None  # set by pack_for_cpu once the weight is loaded
        self.quant = None  # the backend's packed quantized weight, set by finish_quantized
        self.quant_backend = None  # the kernels that packed it (and multiply through it)
        self.quant_parts: dict[object, QuantizedWeight] = {}  # this rank's shards, until finish
        self.input_perm: torch.Tensor | None = None  # act-order weights: x's columns reordered
        self.dense_shards: set[object] = set()
        self.min_rows = 1  # fewer rows are padded to this many (executor/batch_invariance.py)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """A dense checkpoint tensor, or a QuantizedWeight for the weight (never for the bias)."""
        quantized = isinstance(loaded, QuantizedWeight)
        if param is self.weight and quantized:
            return self._load_quantized(param, loaded, shard_id)
        if quantized:
            raise ValueError("a bias cannot be quantized")
        if param is self.weight:
            check_not_mixed(type(self).__name__, {shard_id}, self.quant_parts)
            self.dense_shards.add(shard_id)
        self.load_dense(param, loaded, shard_id)

    def _load_quantized(self, param: nn.Parameter, loaded: QuantizedWeight, shard_id) -> None:
        """Keep this rank's part of a quantized shard until finish_quantized."""
        check_loadable(param)
        check_not_mixed(type(self).__name__, self.dense_shards, {shard_id: loaded})
        check_compatible(self.quant_parts, shard_id, loaded)
        if self.quant_parts:
            check_same_perm(type(self).__name__, self.input_perm, loaded)
        part = self.slice_quantized(loaded, shard_id)
        self.quant_parts[shard_id] = owned(part) if self.tp_size > 1 else part
        self.input_perm = input_perm(loaded)
        release_storage(param)

    def load_dense(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    def shard_rows(self, shard_id) -> tuple[int, int, int]:
        """(rows this rank holds of the shard, which part of the checkpoint's rows, parts)."""
        return self.output_size, 0, 1

    def slice_quantized(self, qw: QuantizedWeight, shard_id) -> QuantizedWeight:
        """This rank's part of a whole checkpoint shard, its shape checked as copy_shard does."""
        rows, part, parts = self.shard_rows(shard_id)
        if qw.shape != (rows * parts, self.input_size):
            raise ValueError(f"expected shape {(rows * parts, self.input_size)}, got {qw.shape}")
        return narrow_rows(qw, part * rows, rows)

    def finish_quantized(self, backend) -> bool:
        """Join the quantized shards in the dense row order and pack them once for `backend`;
        the dense weight becomes a shape (no second copy)."""
        if not self.quant_parts:
            return False
        missing = [s for s in self.weight.shard_ids if s not in self.quant_parts]
        if missing:
            raise ValueError(f"{type(self).__name__}: quantized shards {missing} never loaded")
        parts = [self.quant_parts[s] for s in self.weight.shard_ids]
        self.quant, self.quant_backend = backend.pack_quantized(cat_rows(parts)), backend
        self.weight = shape_only(self.weight)
        self.quant_parts, self.dense_shards = {}, set()
        return True

    def pack_for_cpu(self) -> bool:
        """Move the loaded weight into the CPU GEMM's packed layout (see cpu_gemm). The original
        is then a shape on the meta device: every multiply goes through the packed copy, and a
        second copy of the weights would double the model's memory."""
        if self.quant is not None:  # already packed, by the quantized kernels
            return False
        self.packed = pack_weight(self.weight, self.bias)
        if self.packed is not None:
            self.weight = shape_only(self.weight)
        return self.packed is not None

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is None and self.packed is None and self.min_rows == 1:
            return F.linear(x, self.weight, bias)
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] < self.min_rows:  # batch-invariant mode (executor/batch_invariance.py)
            rows = at_least_rows(lambda r: self._product(r, bias), flat, self.min_rows)
        else:
            rows = self._product(flat, bias)
        return rows.view(*x.shape[:-1], rows.shape[-1])

    def _product(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """rows [N, input_size] -> [N, output_size], through whichever form the weight is in."""
        if self.quant is not None:
            rows = rows if self.input_perm is None else rows.index_select(-1, self.input_perm)
            return self.quant_backend.quant_linear(rows, self.quant, bias)
        if self.packed is not None:
            return packed_linear(rows, self.packed, bias)
        return F.linear(rows, self.weight, bias)

    def row_product(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's product with its bias, for executor/batch_invariance.py's probe."""
        return self._product(rows, self.bias)

    def product_key(self) -> tuple[str, int, int]:
        kind = "quantized" if self.quant is not None else "packed" if self.packed is not None else "dense"
        return kind, self.input_size, self.output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank's output is its slice (no gather)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        super().__init__(
            input_size, _divide(output_size, tp_size, "output size"), bias, tp_rank, tp_size
        )

    def load_dense(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_shard(param.data, loaded, 0, self.tp_rank, self.tp_size)

    def shard_rows(self, shard_id) -> tuple[int, int, int]:
        return self.output_size, self.tp_rank, self.tp_size


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        super().__init__(
            _divide(input_size, tp_size, "input size"), output_size, bias, tp_rank, tp_size
        )

    def load_dense(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        dim = 1 if param is self.weight else None  # the bias is replicated
        copy_shard(param.data, loaded, dim, self.tp_rank, self.tp_size)

    def slice_quantized(self, qw: QuantizedWeight, shard_id) -> QuantizedWeight:
        expected = (self.output_size, self.input_size * self.tp_size)
        if qw.shape != expected:
            raise ValueError(f"expected shape {expected}, got {qw.shape}")
        if input_perm(qw) is not None and self.tp_size > 1:
            raise ValueError("act-order (desc_act) weights reorder the inputs, which a "
                             "row-parallel layer splits across ranks: not supported with "
                             "tensor parallelism")
        return narrow_inputs(qw, self.tp_rank * self.input_size, self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        # Only rank 0 adds the bias, so the all-reduce adds it exactly once.
        out = self._matmul(x, self.bias if self.tp_rank == 0 else None)
        all_reduce(out)
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate_up: [gate | up]).
    Checkpoint shard i (an int) fills rows sum(output_sizes[:i]) onward, per rank."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        self.local_sizes = [_divide(s, tp_size, "output size") for s in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)
        for p in (self.weight, self.bias):
            _attach(p, self.weight_loader, tuple(range(len(output_sizes))))

    def shard_rows(self, shard_id) -> tuple[int, int, int]:
        return self.local_sizes[shard_id], self.tp_rank, self.tp_size

    def load_dense(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        offset = sum(self.local_sizes[:shard_id])
        dst = param.data.narrow(0, offset, self.local_sizes[shard_id])
        copy_shard(dst, loaded, 0, self.tp_rank, self.tp_size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM: output [q heads | k heads | v heads] of head_dim each.
    With more ranks than KV heads, each KV head is replicated on tp_size / num_kv_heads ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        self.num_heads = _divide(num_heads, tp_size, "num_heads")
        self.kv_shards = min(tp_size, num_kv_heads)  # distinct KV slices across ranks
        self.num_kv_heads = _divide(num_kv_heads, self.kv_shards, "num_kv_heads")
        self.head_dim = head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(
            hidden_size, (self.q_size + 2 * self.kv_size) * tp_size, bias, tp_rank, tp_size
        )
        for p in (self.weight, self.bias):
            _attach(p, self.weight_loader, ("q", "k", "v"))

    def shard_rows(self, shard_id) -> tuple[int, int, int]:
        if shard_id == "q":
            return self.q_size, self.tp_rank, self.tp_size
        return self.kv_size, self.tp_rank * self.kv_shards // self.tp_size, self.kv_shards

    def load_dense(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        offset, size = {
            "q": (0, self.q_size),
            "k": (self.q_size, self.kv_size),
            "v": (self.q_size + self.kv_size, self.kv_size),
        }[shard_id]
        dst = param.data.narrow(0, offset, size)
        if shard_id == "q":
            copy_shard(dst, loaded, 0, self.tp_rank, self.tp_size)
        else:
            copy_shard(
                dst, loaded, 0, self.tp_rank * self.kv_shards // self.tp_size, self.kv_shards
            )

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, q+k+v] -> q [T, heads, d], k and v [T, kv_heads, d] (views, no copy)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = qkv.shape[0]
        return (
            q.view(t, self.num_heads, self.head_dim),
            k.view(t, self.num_kv_heads, self.head_dim),
            v.view(t, self.num_kv_heads, self.head_dim),
        )
