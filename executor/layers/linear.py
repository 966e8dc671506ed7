"""Linear layers: the one place that decides how a weight is stored, sharded, loaded and applied.

At tensor-parallel size 1 each layer is a plain F.linear. With TP size N over ranks 0..N-1:

    ColumnParallelLinear  y[:, rank's 1/N of outputs] = x @ W_rank.T     no communication
    RowParallelLinear     y = all_reduce(x[:, rank's 1/N of inputs] @ W_rank.T) (+ bias once)

so a column-parallel layer feeding a row-parallel one (qkv -> attention -> o_proj, gate_up -> down)
costs one all-reduce. Each parameter carries `weight_loader(param, loaded, shard_id)`, which takes a
full checkpoint tensor, checks its shape, and copies in this rank's part; quantized formats and LoRA
plug in here, and model code never touches a weight's storage.
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
        self, input_size: int, output_size: int, bias: bool, tp_rank: int = 0, tp_size: int = 1
    ):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.input_size, self.output_size = input_size, output_size
        self.weight = new_param(output_size, input_size)
        self.bias = new_param(output_size) if bias else None
        for p in (self.weight, self.bias):
            _attach(p, self.weight_loader)
        self.packed: PackedWeight | None = None  # set by pack_for_cpu once the weight is loaded

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    def pack_for_cpu(self) -> bool:
        """Move the loaded weight into the CPU GEMM's packed layout (see cpu_gemm). The original
        is then a shape on the meta device: every multiply goes through the packed copy, and a
        second copy of the weights would double the model's memory."""
        self.packed = pack_weight(self.weight, self.bias)
        if self.packed is not None:
            self.weight = shape_only(self.weight)
        return self.packed is not None

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None:
            rows = packed_linear(x.reshape(-1, x.shape[-1]), self.packed, bias)
            return rows.view(*x.shape[:-1], rows.shape[-1])
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank's output is its slice (no gather)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_rank: int = 0, tp_size: int = 1
    ):
        super().__init__(
            input_size, _divide(output_size, tp_size, "output size"), bias, tp_rank, tp_size
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_shard(param.data, loaded, 0, self.tp_rank, self.tp_size)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_rank: int = 0, tp_size: int = 1
    ):
        super().__init__(
            _divide(input_size, tp_size, "input size"), output_size, bias, tp_rank, tp_size
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        dim = 1 if param is self.weight else None  # the bias is replicated
        copy_shard(param.data, loaded, dim, self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        # Only rank 0 adds the bias, so the all-reduce adds it exactly once.
        out = self._matmul(x, self.bias if self.tp_rank == 0 else None)
        dist.all_reduce(out)
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate_up: [gate | up]).
    Checkpoint shard i (an int) fills rows sum(output_sizes[:i]) onward, per rank."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.local_sizes = [_divide(s, tp_size, "output size") for s in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)
        for p in (self.weight, self.bias):
            _attach(p, self.weight_loader, tuple(range(len(output_sizes))))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
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
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
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

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
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
