"""Tensor parallelism over torch.distributed: N executor ranks, one per process; gloo on the CPU,
on CUDA one GPU per rank with NCCL for the model's collectives (executor/rank_devices.py).

    LLM / ExecutorService --StepPlan--> rank 0 (the Executor the scheduler talks to)
                                          | broadcast of the serialized plan (gloo)
                                          v
                                        ranks 1..N-1 (python -m pagedserve.executor.tensor_parallel)

Rank 0 starts the other ranks through executor/rank_launch.py: by default as child processes of
its own (`subprocess`, so a user's script is never re-imported), with
distributed_executor_backend "ray" as Ray actors placed on a cluster; each gets the same
ExecutorConfig and its rank. Every rank builds the same
Executor on its shard (executor/parallel_state.py: the layers split heads, MLP columns/rows and the
vocabulary, and each checkpoint tensor is sliced by its weight_loader as it is read), with its own
paged KV cache of the same blocks and its own heads. Rank 0 checks each plan, then broadcasts it;
every rank runs the same step (one all-reduce after each row-parallel layer, an all-gather of the
logits; over a shared-memory segment, executor/shm_allreduce.py, else gloo), and since the gathered
logits are the same bytes on every rank, every rank samples the same tokens and keeps the same
per-request state; only rank 0's StepResult is used. One step costs one plan whatever N is.

The rendezvous is a TCPStore that rank 0 binds to a free port (port 0), reached at localhost (mp) or
at rank 0's node IP (ray). A rank reports "ready" (with the bytes of its weights) or its load error
(over a pipe, or as a Ray actor call's result) before joining the group, so a
rank that cannot load fails rank 0's constructor with that rank's message. Once all are ready,
rank 0 creates the shared-memory segment and puts its path in the store (empty: gloo only); each
rank maps it before joining the group, so once the group has formed rank 0 unlinks the file, and
no file outlives the ranks however they end. Rank 0 broadcasts a stop message at close() and waits for the
ranks to exit; a rank that dies makes rank 0's next step fail with a RuntimeError naming it, and
every step after it. A rank whose parent dies exits when its next collective fails (the
shared-memory wait finds rank 0's pid gone, gloo's connection to rank 0 closes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any

import structlog
import torch
import torch.distributed as dist

from pagedserve.executor import parallel_state, rank_launch, shm_allreduce
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.pipeline_parallel import join_stage_groups
from pagedserve.executor.rank_devices import is_cuda, model_backend
from pagedserve.executor.rank_launch import RankLauncher
from pagedserve.executor.shm_allreduce import CollectiveError, ShmCommunicator

log = structlog.get_logger("pagedserve.executor.tensor_parallel")

HEADER_BYTES = 1 << 14  # one broadcast carries a plan up to this size; a larger one takes two
STOP = -1
READY_TIMEOUT_S = 600.0  # a rank's model load
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # one collective, at most
SEGMENT_KEY = "shm_segment"  # the store's key for the segment's path ("": gloo only)
ENV_DISABLE_SHM = "PAGEDSERVE_DISABLE_SHM_ALLREDUCE"  # set: gloo for everything (benchmarks)


def check_model(architecture: str, num_heads: int, num_kv_heads: int, intermediate_size: int,
                tp_size: int) -> None:
    """ValueError naming tensor_parallel_size when this model's heads or MLP cannot be split."""
    if tp_size == 1:
        return
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size: {tp_size} does not divide {architecture}'s "
                         f"num_attention_heads ({num_heads})")
    if (num_kv_heads % tp_size) if tp_size <= num_kv_heads else (tp_size % num_kv_heads):
        raise ValueError(f"tensor_parallel_size: {tp_size} and {architecture}'s "
                         f"num_key_value_heads ({num_kv_heads}): one must divide the other "
                         "(fewer KV heads than ranks are replicated)")
    if intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size: {tp_size} does not divide {architecture}'s "
                         f"intermediate_size ({intermediate_size})")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes this rank's weights take: parameters with storage (a tied one once) plus the packed
    copies that replaced them (layers/cpu_gemm.py) and quantized layers' packed codes."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        if t.is_mkldnn:  # oneDNN's opaque blocked layout: no storage to ask, about numel's bytes
            total += t.numel() * t.element_size()
        elif t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
    for m in model.modules():
        for packed in _packed_weights(m):
            add(packed.onednn)
            add(packed.panels)
            add(packed.pairs)
    return total


def _packed_weights(module: torch.nn.Module) -> list:
    """A layer's packed weight, or each expert's pair (layers/fused_moe.py)."""
    packed = getattr(module, "packed", None)
    if isinstance(packed, list):
        return [w for pair in packed for w in pair]
    return [] if packed is None else [packed]


def _threads_per_rank(tp_size: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // tp_size)


class RankGroup:
    """Rank 0's side: the other ranks' processes, the process group, the plan broadcast."""

    def __init__(self, config: ExecutorConfig):
        self.size = config.world_size  # tp x pp ranks (executor/pipeline_parallel.py)
        self.config = config
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size: this process already holds a "
                               "torch.distributed group (one tensor-parallel executor per "
                               "process: close the other first)")
        self.launcher: RankLauncher | None = None  # starts ranks 1..N-1 (executor/rank_launch.py)
        self._header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        self.joined = False
        self.broken: str | None = None
        self.rank_weight_bytes: list[int] = []
        self.rank_kv_blocks: list[int] = []  # ranks 1..N-1's pools (on CUDA each sized its own)
        self._threads = 0
        self.shm: ShmCommunicator | None = None
        self._segment: str | None = None  # the file, until every rank has it mapped
        try:
            self.launcher = rank_launch.launcher(config)  # ray: joins the cluster here
            # the ranks reach the store at the launcher's host (loopback, or this node's IP)
            self.store = dist.TCPStore(self.launcher.host, 0, self.size, is_master=True,
                                       wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
            self.launcher.start(config, self.size, self.store.port, _threads_per_rank(self.size))
        except BaseException:
            self.close()
            raise
        self._threads = torch.get_num_threads()  # restored at close
        torch.set_num_threads(_threads_per_rank(self.size))  # the ranks share this machine's CPUs

    def join(self, own_weight_bytes: int) -> None:
        """Waits for every rank's load (raising its error if it failed), then forms the group."""
        reports = [self.launcher.wait_ready(rank, READY_TIMEOUT_S) for rank in range(1, self.size)]
        self.rank_weight_bytes = [own_weight_bytes] + [r["weight_bytes"] for r in reports]
        self.rank_kv_blocks = [r["num_kv_blocks"] for r in reports]
        self._open_segment()
        # gloo on every device: plans and samples are host bytes (executor/rank_devices.py)
        dist.init_process_group("gloo", store=self.store, rank=0, world_size=self.size,
                                timeout=COLLECTIVE_TIMEOUT)
        join_stage_groups(self.config.tensor_parallel_size, self.config.pipeline_parallel_size, 0,
                          model_backend(self.config.device))
        self.joined = True
        if self.shm is not None:  # every rank mapped it before joining: the file can go
            assert self.shm.peers_attached(), "a rank joined without mapping the segment"
            shm_allreduce.unlink_segment(self._segment)
            self._segment = None
            parallel_state.use_collectives(self.shm)
        log.info("tensor-parallel ranks joined", size=self.size,
                 weight_bytes=self.rank_weight_bytes, shared_memory=self.shm is not None)

    def _open_segment(self) -> None:
        """The shared-memory segment for the collectives, its path in the store for the ranks;
        an empty path (gloo) where it is turned off, unsupported or cannot be made."""
        path = ""
        one_stage = self.config.pipeline_parallel_size == 1  # the segment spans all ranks
        on_host = not is_cuda(self.config.device)  # host memory: CUDA tensors go over NCCL
        if on_host and not self.launcher.all_on_this_node():  # Ray placed ranks on other nodes
            log.info("tensor-parallel ranks span several nodes: the all-reduce runs over gloo")
        elif on_host and one_stage and shm_allreduce.supported() and \
                os.environ.get(ENV_DISABLE_SHM, "") in ("", "0"):
            try:
                path = self._segment = shm_allreduce.create_segment(self.size)
                self.shm = ShmCommunicator(path, 0, self.size,
                                           COLLECTIVE_TIMEOUT.total_seconds())
            except OSError as e:
                log.warning("no shared-memory segment for the all-reduce; using gloo",
                            error=str(e))
                self._close_segment()
                path = ""
        self.store.set(SEGMENT_KEY, path)

    def _close_segment(self) -> None:
        parallel_state.use_collectives(None)
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if self._segment is not None:
            shm_allreduce.unlink_segment(self._segment)
            self._segment = None

    @property
    def procs(self) -> list[subprocess.Popen]:
        """The ranks' processes under the mp backend (none under ray: they are Ray actors)."""
        return getattr(self.launcher, "procs", [])

    def failure(self) -> str | None:
        """What broke the group (a rank that died, a failed collective), or None."""
        if self.broken is None and self.launcher is not None:
            self.broken = self.launcher.dead_rank()
        return self.broken

    def check_alive(self) -> None:
        if self.failure() is not None:
            raise RuntimeError(f"{self.broken}: the executor cannot step; restart it")

    def collective_failed(self, error: BaseException) -> bool:
        """Whether `error` (raised by a step) came from the group: a rank died, or gloo failed."""
        if isinstance(error, (CollectiveError, getattr(dist, "DistError", ()))):
            return True
        time.sleep(0.1)  # a rank that died takes a moment to be reaped
        return self.launcher.dead_rank() is not None

    def dead_rank_error(self, error: BaseException) -> RuntimeError:
        """The error to raise for a collective that failed: which rank died, if one did."""
        time.sleep(0.1)  # a rank that died takes a moment to be reaped
        try:
            self.check_alive()
        except RuntimeError as dead:
            return dead
        self.broken = f"a tensor-parallel collective failed ({error})"
        return RuntimeError(f"{self.broken}: the executor cannot step; restart it")

    def broadcast_plan(self, payload: bytes) -> None:
        send_message(self._header, payload)

    def close(self) -> None:
        """Stops the ranks: a broadcast stop once they have joined (SIGKILL for one that does
        not exit in 10 s), SIGKILL while they load (rank 0 failed; they cannot finish)."""
        stopped = False
        if self.joined and self.broken is None:
            try:
                send_message(self._header, None)
                stopped = True
            except RuntimeError:
                pass
        launcher, self.launcher = self.launcher, None
        if launcher is not None:  # ray: kills the actors, removes the placement group
            launcher.stop(graceful=stopped)
        self._close_segment()
        if self.joined:
            dist.destroy_process_group()
            self.joined = False
        if self._threads:
            torch.set_num_threads(self._threads)
            self._threads = 0


def send_message(header: torch.Tensor, payload: bytes | None) -> None:
    """Rank 0: one broadcast of [int64 length | the first bytes], a second for the rest."""
    length = STOP if payload is None else len(payload)
    header[:8] = torch.tensor([length], dtype=torch.int64).view(torch.uint8)
    head = 0 if payload is None else min(length, HEADER_BYTES - 8)
    if head:
        header[8 : 8 + head] = torch.frombuffer(bytearray(payload[:head]), dtype=torch.uint8)
    dist.broadcast(header, src=0)
    if payload is not None and length > head:
        dist.broadcast(torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8), src=0)


def receive_message(header: torch.Tensor) -> bytes | None:
    """Ranks 1..N-1: the next message (None: stop)."""
    dist.broadcast(header, src=0)
    length = int(header[:8].view(torch.int64).item())
    if length == STOP:
        return None
    head = min(length, HEADER_BYTES - 8)
    data = header[8 : 8 + head].numpy().tobytes()
    if length > head:
        rest = torch.empty(length - head, dtype=torch.uint8)
        dist.broadcast(rest, src=0)
        data += rest.numpy().tobytes()
    return data


def _rank_main(rank: int, port: int, status_fd: int, config: ExecutorConfig) -> int:
    """One rank of 1..N-1 started by the mp launcher: load, report over the pipe, join, run."""
    executor, status = load_rank(rank, config)
    with os.fdopen(status_fd, "w") as out:
        out.write(json.dumps(status) + "\n")
    return 1 if executor is None else run_rank(executor, rank, "127.0.0.1", port, config)


def load_rank(rank: int, config: ExecutorConfig, *, own_gpu: bool = False) -> tuple[Any, dict]:
    """Rank `rank`'s Executor and its report for rank 0 (executor/rank_launch.py): ready with
    its weights' bytes and KV blocks, or (None and) its load error. own_gpu: the process sees
    only its own GPU (a Ray actor: rank_devices.rank_device)."""
    from pagedserve.executor.executor import Executor

    try:
        executor = Executor(config, rank=rank, own_gpu=own_gpu)
    except Exception as e:  # rank 0 raises it (it most likely failed the same way)
        return None, {"error": str(e), "type": type(e).__name__}
    return executor, {"ready": True, "weight_bytes": weight_bytes(executor.model),
                      "num_kv_blocks": executor.num_kv_blocks}


def run_rank(executor: Any, rank: int, host: str, port: int, config: ExecutorConfig) -> int:
    """Joins rank 0's group (its TCPStore at host:port), then runs every plan rank 0
    broadcasts until a stop (0) or the group breaks (rank_launch.GROUP_LOST_EXIT)."""
    from pagedserve.protos import executor_pb2

    store = dist.TCPStore(host, port, config.world_size, is_master=False,
                          timeout=COLLECTIVE_TIMEOUT)
    segment = store.get(SEGMENT_KEY).decode()  # mapped before joining: rank 0 then unlinks it
    shm = (ShmCommunicator(segment, rank, config.world_size,
                           COLLECTIVE_TIMEOUT.total_seconds()) if segment else None)
    dist.init_process_group("gloo", store=store, rank=rank,
                            world_size=config.world_size, timeout=COLLECTIVE_TIMEOUT)
    join_stage_groups(config.tensor_parallel_size, config.pipeline_parallel_size, rank,
                      model_backend(config.device))
    parallel_state.use_collectives(shm)
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    while True:
        try:
            message = receive_message(header)
        except RuntimeError:  # rank 0 is gone, or another rank the broadcast reaches
            log.warning("tensor-parallel group is gone (a rank died); exiting", rank=rank)
            return rank_launch.GROUP_LOST_EXIT
        if message is None:
            break
        try:
            executor.execute_local(executor_pb2.StepPlan.FromString(message))
        except Exception:  # rank 0 ran the same step: it raised the same, or the group breaks
            log.exception("step failed", rank=rank)
    dist.destroy_process_group()
    if shm is not None:
        shm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one tensor-parallel executor rank (started by rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--status-fd", type=int, required=True)
    p.add_argument("--config", required=True, help="the ExecutorConfig as JSON")
    args = p.parse_args(argv)
    config = ExecutorConfig(**json.loads(args.config))
    torch.set_num_threads(_threads_per_rank(config.world_size))
    return _rank_main(args.rank, args.port, args.status_fd, config)


if __name__ == "__main__":
    sys.exit(main())
