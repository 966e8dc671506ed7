"""This process's place in a tensor-parallel group: (rank, size), read by the layers at construction.

Model files build their layers without naming a rank (layers/linear.py, layers/embedding.py take
tp_rank / tp_size = None and read them here), so a model class runs sharded unchanged: the loader
builds it inside `tensor_parallel(rank, size)` (executor/loader.py). Outside it, (0, 1): one rank.
The group itself is torch.distributed's default process group (executor/tensor_parallel.py starts
it). The row-parallel layers' all-reduce and the LM head's all-gather go through all_reduce /
all_gather here: over the ranks' shared-memory segment when tensor_parallel.py installed one
(executor/shm_allreduce.py: ranks on one machine, CPU only), else over the group: the whole world
(gloo), or the group use_tp_group installed: with pipeline parallelism the tensor-parallel ranks of
this rank's stage, on CUDA an NCCL group (executor/rank_devices.py decides which backend).

Likewise (pp_rank, pp_size): this process's pipeline stage, read by the model classes at
construction (executor/models/pipeline_stage.py), which then build only that stage's layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.distributed as dist

# (rank, size) of this process in each kind of split: "tensor" (its shard of every layer) and
# "pipeline" (its stage of the layers)
_position = {"tensor": (0, 1), "pipeline": (0, 1)}


class Collectives(Protocol):
    def all_reduce(self, tensor: torch.Tensor) -> None: ...
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


_collectives: Collectives | None = None
_tp_group: dist.ProcessGroup | None = None  # None: the default group (every rank)
# with pipeline parallelism, the two-rank groups to the previous and next stage's rank
_stage_links: tuple[dist.ProcessGroup | None, dist.ProcessGroup | None] = (None, None)


def tp_rank() -> int:
    return _position["tensor"][0]


def tp_size() -> int:
    return _position["tensor"][1]


def pp_rank() -> int:
    return _position["pipeline"][0]


def pp_size() -> int:
    return _position["pipeline"][1]


def resolve(rank: int | None, size: int | None) -> tuple[int, int]:
    """A layer's (tp_rank, tp_size): the ones given, else this process's."""
    return (tp_rank() if rank is None else rank), (tp_size() if size is None else size)


@contextlib.contextmanager
def _positioned(kind: str, what: str, rank: int, size: int) -> Iterator[None]:
    """This process at `rank` of `size` in a `kind` split while the block runs."""
    if not 0 <= rank < size:
        raise ValueError(f"{what} {rank} is outside [0, {size})")
    old, _position[kind] = _position[kind], (rank, size)
    try:
        yield
    finally:
        _position[kind] = old


def tensor_parallel(rank: int, size: int) -> contextlib.AbstractContextManager[None]:
    """Layers built inside take rank `rank` of `size`."""
    return _positioned("tensor", "tensor-parallel rank", rank, size)


def pipeline_parallel(rank: int, size: int) -> contextlib.AbstractContextManager[None]:
    """Models built inside are stage `rank` of `size` (executor/models/pipeline_stage.py)."""
    return _positioned("pipeline", "pipeline stage", rank, size)


def use_tp_group(group: dist.ProcessGroup | None) -> None:
    """The group the collectives below run over (None: the default, gloo, group): with pipeline
    parallelism the tensor-parallel ranks of this process's stage; on CUDA an NCCL group."""
    global _tp_group
    _tp_group = group


def use_stage_links(prev: dist.ProcessGroup | None, next_: dist.ProcessGroup | None) -> None:
    """The groups this rank receives from the previous stage over and sends to the next over
    (executor/pipeline_parallel.py)."""
    global _stage_links
    _stage_links = (prev, next_)


def stage_links() -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    return _stage_links


def use_collectives(collectives: Collectives | None) -> None:
    """This process's collectives from now on (None: torch.distributed's group)."""
    global _collectives
    _collectives = collectives


def all_reduce(tensor: torch.Tensor) -> None:
    """Sums `tensor` over the ranks, in place."""
    if _collectives is not None:
        _collectives.all_reduce(tensor)
    else:
        dist.all_reduce(tensor, group=_tp_group)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor`, in rank order."""
    if _collectives is not None:
        return _collectives.all_gather(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(_tp_group))]
    dist.all_gather(parts, tensor, group=_tp_group)
    return parts
