"""Where each executor rank runs, and which torch.distributed backend carries what: the one place
that decides both from ExecutorConfig.device (pure functions, so tests can ask them anything).

- The default process group is gloo on every device. It carries what lives in host memory: the
  serialized plans and the stop message (executor/tensor_parallel.py), the last pipeline stage's
  sampled tokens (executor/pipeline_parallel.py). So no CPU tensor ever goes through NCCL.
- The model's collectives (the all-reduce after each row-parallel layer and the embedding, the
  logits' all-gather, the pipeline stages' hand-offs) run over groups of model_backend(device):
  gloo on the CPU (behind the shared-memory all-reduce, which is host memory and so CPU only),
  NCCL on CUDA, on the GPU tensors themselves.
- On CUDA rank r runs on cuda:(base + r), base the index in `device` ("cuda": 0). Under the mp
  launcher every rank sees every GPU: the indices mean the same in every rank, the user's own
  CUDA_VISIBLE_DEVICES is honoured as it is, and NCCL finds the peers' GPUs for P2P by itself.
  A Ray actor sees only the GPU Ray gave it (Ray sets its CUDA_VISIBLE_DEVICES): cuda:0.

Not yet run on a machine with two GPUs (docs/architecture.md).
"""

from __future__ import annotations

CPU_BACKEND = "gloo"  # the default group's, on every device
CUDA_BACKEND = "nccl"


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def model_backend(device: str) -> str:
    """The backend of the model's collectives on `device` (the default group is always gloo)."""
    return CUDA_BACKEND if is_cuda(device) else CPU_BACKEND


def device_index(device: str) -> int:
    """The N of cuda:N ("cuda" and "cpu": 0)."""
    _, _, index = device.partition(":")
    return int(index or 0)


def rank_device(device: str, rank: int, world_size: int, *, own_gpu: bool = False) -> str:
    """Rank `rank`'s device: `device` itself with one rank or on the CPU; on CUDA cuda:(base +
    rank), or cuda:0 for a rank that sees only its own GPU (own_gpu: a Ray actor)."""
    if world_size == 1 or not is_cuda(device):
        return device
    return "cuda:0" if own_gpu else f"cuda:{device_index(device) + rank}"


def check_gpu_count(device: str, tp_size: int, pp_size: int, gpu_count: int) -> None:
    """ValueError naming both sizes when this machine has too few GPUs for every rank (the mp
    launcher: every rank on this machine, one GPU each, from `device`'s index up)."""
    world = tp_size * pp_size
    if world == 1 or not is_cuda(device):
        return
    base = device_index(device)
    if base + world > gpu_count:
        raise ValueError(
            f"tensor_parallel_size {tp_size} x pipeline_parallel_size {pp_size}: {world} ranks "
            f"on {device} need one GPU each (cuda:{base}..cuda:{base + world - 1}), but "
            f"torch.cuda.device_count() is {gpu_count}")


def physical_gpu(index: int, visible: str | None) -> str:
    """The id (as CUDA_VISIBLE_DEVICES and Ray name it) of this process's cuda:index, given its
    CUDA_VISIBLE_DEVICES (None: unset, every GPU visible in order)."""
    if visible is None:
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[index] if index < len(ids) else str(index)
