"""How rank 0 starts executor ranks 1..N-1, and how each reports "ready" or its load error.

Rank 0 is the executor process itself (the one the scheduler or `LLM` talks to); the launcher
starts the others and answers for them until they end. ExecutorConfig.distributed_executor_backend
picks one of two:

- mp (the default): each rank is a child process of rank 0 on this machine (`python -m
  pagedserve.executor.tensor_parallel`, so a user's script is never re-imported); it reports one
  JSON line over a pipe, and rank 0 polls the process to see it die.
- ray: each rank is a Ray actor on an existing cluster (`ray start --head`, joined with
  `ray.init(address=...)`, "auto" honouring RAY_ADDRESS as Ray does). One placement group holds a
  bundle per rank; bundle 0 is reserved for rank 0 and pinned to its node (Ray's node-id label),
  so Ray counts rank 0's CPUs too, and PACK keeps the others on the fewest nodes, this
  one first when it has room. Rank r's actor runs in bundle r; its load() call returns the report
  (the pipe's line), its run() call joins the group and returns only when the rank ends, so that
  call's result is how rank 0 sees the rank die. The placement group and the actors belong to
  rank 0's Ray job: were rank 0 killed, Ray removes them with the job.

Every rank then joins rank 0's TCPStore at `launcher.host` (127.0.0.1, or under Ray rank 0's node
IP) and torch.distributed's gloo group; the shared-memory all-reduce is used only when every rank
runs on rank 0's node (`all_on_this_node`) and on the CPU.

On CUDA (executor/rank_devices.py) an mp rank sees every GPU, as rank 0 does, and takes
cuda:(base + rank): nothing narrows CUDA_VISIBLE_DEVICES per rank. A Ray rank's bundle holds one
GPU, which Ray alone exposes to the actor (its CUDA_VISIBLE_DEVICES): it runs on cuda:0. Bundle 0
reserves rank 0's GPU too, but rank 0 is no actor and takes `device` as given; a rank on its node
that Ray gave the same GPU is refused at load, naming both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Protocol

import structlog
import torch

from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.rank_devices import device_index, is_cuda, physical_gpu

# A rank's exit code when a collective failed under it (rank 0's plan broadcast or the step's
# all-reduce): another rank's death is the cause, and the launcher names that one instead.
GROUP_LOST_EXIT = 3

log = structlog.get_logger("pagedserve.executor.rank_launch")

PLACEMENT_TIMEOUT_S = 120.0  # for the cluster to place every rank's bundle
PROBE_TIMEOUT_S = 5.0  # a Ray address that does not answer: ray.init itself retries for minutes
STOP_TIMEOUT_S = 10.0  # for a rank told to stop to end, before it is killed


class RankLauncher(Protocol):
    host: str  # where ranks 1..N-1 reach rank 0's TCPStore

    def start(self, config: ExecutorConfig, size: int, port: int, threads: int) -> None:
        """Starts ranks 1..size-1 loading `config`; each then joins the store at host:port."""

    def wait_ready(self, rank: int, timeout_s: float) -> dict:
        """Rank `rank`'s report once it has loaded ({"weight_bytes": ...}); raises its error."""

    def all_on_this_node(self) -> bool:
        """Whether every rank runs on rank 0's machine (after wait_ready)."""

    def dead_rank(self) -> str | None:
        """"tensor-parallel rank R died (...)" for the first rank found ended, else None."""

    def stop(self, graceful: bool) -> None:
        """graceful: the ranks were told to stop; waits for them (then kills). Else kills now."""


def launcher(config: ExecutorConfig) -> RankLauncher:
    """The launcher config.distributed_executor_backend names."""
    if config.distributed_executor_backend == "ray":
        return RayLauncher(config.ray_address)
    return MpLauncher()


def raise_load_error(rank: int, status: dict) -> None:
    """A rank's load error: a ValueError as it is (rank 0 most likely failed the same way, and a
    ValueError names the option at fault), anything else as a RuntimeError naming the rank."""
    if "error" in status:
        if status.get("type") == "ValueError":
            raise ValueError(status["error"])
        raise RuntimeError(f"tensor-parallel rank {rank}: {status['error']}")


# ---- mp: child processes on this machine ---------------------------------------------------------


class MpLauncher:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._pipes: list[int] = []  # read ends, one per rank 1..N-1

    def start(self, config: ExecutorConfig, size: int, port: int, threads: int) -> None:
        cfg = json.dumps(dataclasses.asdict(config))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for rank in range(1, size):
            read, write = os.pipe()
            self._pipes.append(read)
            cmd = [sys.executable, "-m", "pagedserve.executor.tensor_parallel",
                   "--rank", str(rank), "--port", str(port),
                   "--status-fd", str(write), "--config", cfg]
            try:
                self.procs.append(subprocess.Popen(cmd, pass_fds=(write,), env=env,
                                                   stdin=subprocess.DEVNULL))
            finally:
                os.close(write)

    def wait_ready(self, rank: int, timeout_s: float) -> dict:
        fd, proc = self._pipes[rank - 1], self.procs[rank - 1]
        deadline, data = time.monotonic() + timeout_s, b""
        while b"\n" not in data:
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rank {rank} did not load the model in "
                                   f"{timeout_s:.0f} s")
            ready, _, _ = select.select([fd], [], [], 0.2)
            chunk = os.read(fd, 1 << 16) if ready else b""
            if ready and not chunk:  # closed: the rank exited
                proc.wait(5)
                raise RuntimeError(f"tensor-parallel rank {rank} exited while loading "
                                   f"(exit code {proc.returncode})")
            data += chunk
        status = json.loads(data.split(b"\n", 1)[0])
        raise_load_error(rank, status)
        return status

    def all_on_this_node(self) -> bool:
        return True

    def dead_rank(self) -> str | None:
        """The rank whose death broke the group: one that exited for a reason of its own before
        one that left only because the group broke under it (GROUP_LOST_EXIT), whatever their
        numbers; the lowest-numbered of equals."""
        ended = [(proc.returncode == GROUP_LOST_EXIT, rank, proc.returncode)
                 for rank, proc in enumerate(self.procs, start=1) if proc.poll() is not None]
        if not ended:
            return None
        _, rank, code = min(ended)
        return f"tensor-parallel rank {rank} died (exit code {code})"

    def stop(self, graceful: bool) -> None:
        for proc in self.procs:
            if not graceful:
                proc.kill()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for fd in self._pipes:
            os.close(fd)
        self._pipes, self.procs = [], []


# ---- ray: actors in a placement group on an existing cluster --------------------------------------


class RankActor:
    """Rank r of 1..N-1 under the ray backend (ray.remote wraps it at launch, so this module
    imports without Ray). Ray runs a plain actor's calls one at a time, in the order submitted, on
    one thread: load() then run() is the mp rank's main, and the model's OpenMP team is the one
    every step uses."""

    def __init__(self, rank: int, threads: int) -> None:
        torch.set_num_threads(threads)  # the bundle's CPUs
        self.rank, self.executor, self.config = rank, None, None

    def load(self, config: ExecutorConfig) -> dict:
        import ray

        from pagedserve.executor.tensor_parallel import load_rank

        self.config = config
        # Ray narrowed CUDA_VISIBLE_DEVICES to the bundle's GPU: cuda:0 here
        self.executor, status = load_rank(self.rank, config, own_gpu=True)
        return {**status, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def run(self, host: str, port: int) -> int:
        """Joins rank 0's group and runs its plans until told to stop (0) or it is gone (1)."""
        from pagedserve.executor.tensor_parallel import run_rank

        if self.executor is None:  # load() failed and said so
            return 1
        try:
            return run_rank(self.executor, self.rank, host, port, self.config)
        finally:
            self.executor = None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ValueError("distributed_executor_backend: 'ray' needs the ray package "
                         "(pip install 'pagedserve[ray]')") from e
    return ray


def resolve_ray_address(address: str) -> str:
    """The address ray.init will use: RAY_ADDRESS stands in for "auto" (as in ray.init)."""
    env = os.environ.get("RAY_ADDRESS", "")
    return env if address == "auto" and env else address


def _probe(address: str) -> None:
    """RuntimeError naming the address when nothing listens there: ray.init would retry for
    minutes. "auto" (a local cluster found through Ray's own files) fails fast by itself."""
    if address == "auto":
        return
    if address.startswith("ray://"):
        raise ValueError(f"ray_address: {address!r} is a Ray Client address; rank 0 must run on "
                         "a node of the cluster (give the GCS address, host:port)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address: must be 'auto' or the cluster's host:port, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise RuntimeError(f"ray_address: no Ray cluster at {address} ({e}); start one with "
                           "`ray start --head` or pass its address") from e


def connect_ray(address: str) -> Any:
    """ray.init on the cluster at `address`, keeping this process's SIGTERM handler (ray.init
    replaces it with sys.exit on the main thread; `serve` and users stop gracefully with it)."""
    ray = _import_ray()
    target = resolve_ray_address(address)
    _probe(target)
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=target, log_to_driver=True)
    except ConnectionError as e:
        raise RuntimeError(f"ray_address: no Ray cluster at {target!r} ({e})") from e
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return ray


def _bundle(config: ExecutorConfig, threads: int) -> dict[str, float]:
    """One rank's resources: its CPU threads, or on CUDA one GPU (and a CPU to drive it)."""
    if config.device.startswith("cuda"):
        return {"GPU": 1.0, "CPU": 1.0}
    return {"CPU": float(threads)}


class RayLauncher:
    def __init__(self, address: str) -> None:
        self._ray = _import_ray()
        self._owns_ray = not self._ray.is_initialized()  # a user's own ray.init is left alone
        if self._owns_ray:
            connect_ray(address)
        self.address = resolve_ray_address(address)
        try:
            self.host = self._ray.util.get_node_ip_address()  # the TCPStore's, for every rank
            self.node_id = self._ray.get_runtime_context().get_node_id()
        except BaseException:
            if self._owns_ray:
                self._ray.shutdown()
            raise
        self.pg: Any = None
        self.actors: list[Any] = []
        self._loads: list[Any] = []  # load() results, by rank - 1
        self._runs: list[Any] = []  # run() results: ready once the rank has ended
        self.reports: dict[int, dict] = {}
        self.rank0_gpu: str | None = None  # on CUDA, rank 0's GPU id as Ray names them
        self._ended: Any = None  # the first run() result found ready (the watcher's)
        self._dead: str | None = None
        self._watcher: threading.Thread | None = None

    def start(self, config: ExecutorConfig, size: int, port: int, threads: int) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = _bundle(config, threads)
        if is_cuda(config.device):
            self.rank0_gpu = physical_gpu(device_index(config.device),
                                          os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.pg = self._place(size, bundle)
        actor_class = self._ray.remote(RankActor)
        for rank in range(1, size):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
            actor = actor_class.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0.0),
                scheduling_strategy=strategy, max_restarts=0).remote(rank, threads)
            self.actors.append(actor)
            self._loads.append(actor.load.remote(config))
            self._runs.append(actor.run.remote(self.host, port))
        self._watcher = threading.Thread(target=self._watch, name="ray-rank-watcher", daemon=True)
        self._watcher.start()
        log.info("tensor-parallel ranks placed on Ray", address=self.address, size=size,
                 bundle=bundle, rank0_node=self.host)

    def _place(self, size: int, bundle: dict[str, float]) -> Any:
        """The placement group: bundle r for rank r, bundle 0 on this node (rank 0 is this
        process, which Ray did not place), PACK for the rest (this node first when it has room,
        so the all-reduce can stay in shared memory; other nodes when not)."""
        from ray.util.placement_group import (
            NODE_ID_LABEL_KEY,
            placement_group,
            placement_group_table,
        )

        pin = [{NODE_ID_LABEL_KEY: self.node_id}] + [{} for _ in range(size - 1)]
        pg = placement_group([dict(bundle) for _ in range(size)], strategy="PACK",
                             bundle_label_selector=pin)
        ready, _ = self._ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready or placement_group_table(pg)["bundles_to_node_id"][0] != self.node_id:
            self._ray.util.remove_placement_group(pg)
            raise RuntimeError(
                f"distributed_executor_backend ray: the cluster at {self.address} did not place "
                f"{size} bundles of {bundle} (bundle 0 on this node, {self.host}) in "
                f"{PLACEMENT_TIMEOUT_S:.0f} s; its free resources: "
                f"{self._ray.available_resources()}")
        return pg

    def _watch(self) -> None:
        """Blocks until some rank's run() ends (it returned, or its actor died), so dead_rank()
        costs rank 0's steps no call into Ray."""
        try:
            ready, _ = self._ray.wait(list(self._runs), num_returns=1)
        except Exception as e:  # Ray shut down under it: nothing left to watch
            log.debug("rank watcher stopped", error=str(e))
            return
        self._ended = ready[0]

    def wait_ready(self, rank: int, timeout_s: float) -> dict:
        ray = self._ray
        try:
            status = ray.get(self._loads[rank - 1], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"tensor-parallel rank {rank} did not load the model in "
                               f"{timeout_s:.0f} s") from None
        except ray.exceptions.RayError as e:  # its actor died, or could not be created
            raise RuntimeError(f"tensor-parallel rank {rank} exited while loading "
                               f"(Ray: {_first_line(e)})") from e
        raise_load_error(rank, status)
        check_gpu_clash(rank, status, self.node_id, self.rank0_gpu)
        self.reports[rank] = status
        log.info("tensor-parallel rank ready", rank=rank, pid=status["pid"],
                 node=status["node_ip"], on_rank0_node=status["node_id"] == self.node_id)
        return status

    def all_on_this_node(self) -> bool:
        return all(r["node_id"] == self.node_id for r in self.reports.values())

    def dead_rank(self) -> str | None:
        if self._dead is None and self._ended is not None:
            rank = self._runs.index(self._ended) + 1
            where = self.reports.get(rank, {})
            try:
                why = f"its actor returned {self._ray.get(self._ended, timeout=0)}"
            except Exception as e:  # ActorDiedError and kin: the usual case
                why = f"Ray: {_first_line(e)}"
            self._dead = (f"tensor-parallel rank {rank} died (Ray actor, pid {where.get('pid')} "
                          f"on {where.get('node_ip')}; {why})")
        return self._dead

    def stop(self, graceful: bool) -> None:
        ray = self._ray
        if graceful and self._runs:
            ray.wait(list(self._runs), num_returns=len(self._runs), timeout=STOP_TIMEOUT_S)
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # already gone
                log.debug("ray.kill", error=str(e))
        if self._watcher is not None:  # the killed actors' run() results end its wait
            self._watcher.join(STOP_TIMEOUT_S)
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
        self.actors, self._loads, self._runs, self.pg, self._watcher = [], [], [], None, None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def check_gpu_clash(rank: int, status: dict, rank0_node: str, rank0_gpu: str | None) -> None:
    """RuntimeError when Ray gave rank `rank`, on rank 0's node, the GPU rank 0 runs on (rank 0 is
    no actor: Ray cannot tell it which of the node's GPUs bundle 0 holds)."""
    if rank0_gpu is None or status.get("node_id") != rank0_node:
        return
    if rank0_gpu in status.get("gpu_ids", []):
        raise RuntimeError(
            f"tensor-parallel rank {rank}: Ray gave it GPU {rank0_gpu}, the one rank 0 runs on; "
            "give rank 0 another device (cuda:N) or restrict this node's Ray GPUs")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
