"""This process's place in a tensor-parallel group: (rank, size), read by the layers at construction.

Model files build their layers without naming a rank (layers/linear.py, layers/embedding.py take
tp_rank / tp_size = None and read them here), so a model class runs sharded unchanged: the loader
builds it inside `tensor_parallel(rank, size)` (executor/loader.py). Outside it, (0, 1): one rank.
The group itself is torch.distributed's default process group (executor/tensor_parallel.py starts
it). The row-parallel layers' all-reduce and the LM head's all-gather go through all_reduce /
all_gather here: over the ranks' shared-memory segment when tensor_parallel.py installed one
(executor/shm_allreduce.py: ranks on one machine), else over the group (gloo).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.distributed as dist

_rank, _size = 0, 1


class Collectives(Protocol):
    def all_reduce(self, tensor: torch.Tensor) -> None: ...
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


_collectives: Collectives | None = None


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def resolve(rank: int | None, size: int | None) -> tuple[int, int]:
    """A layer's (tp_rank, tp_size): the ones given, else this process's."""
    return (_rank if rank is None else rank), (_size if size is None else size)


@contextlib.contextmanager
def tensor_parallel(rank: int, size: int) -> Iterator[None]:
    """Layers built inside take rank `rank` of `size`."""
    global _rank, _size
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside [0, {size})")
    old = _rank, _size
    _rank, _size = rank, size
    try:
        yield
    finally:
        _rank, _size = old


def use_collectives(collectives: Collectives | None) -> None:
    """This process's collectives from now on (None: torch.distributed's group)."""
    global _collectives
    _collectives = collectives


def all_reduce(tensor: torch.Tensor) -> None:
    """Sums `tensor` over the ranks, in place."""
    if _collectives is not None:
        _collectives.all_reduce(tensor)
    else:
        dist.all_reduce(tensor)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor`, in rank order."""
    if _collectives is not None:
        return _collectives.all_gather(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts
