"""Real service processes on unix sockets, torn down (process group and all) after each use."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.health import grpc_serving
from tests.conftest import ROOT, model_dir
from tests.waiting import router_ports

# A small pool keeps the tests fast and makes "every block is free again" meaningful.
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 64
MAX_MODEL_LEN = 256
EXECUTOR_SERVICE = "pagedserve.v1.Executor"
SCHEDULER_SERVICE = "pagedserve.v1.Scheduler"


class Service:
    """One `pagedserve ...` child process, its log in a file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pagedserve.cli", *argv], cwd=ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_serving(self, address: str, service: str = "", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if grpc_serving(address, service, timeout=1.0):
                return
            time.sleep(0.1)
        pytest.fail(f"{self.name} not SERVING after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its group
        return self.proc.returncode


@pytest.fixture(scope="session")
def llama_dir() -> Path:
    return model_dir("llama")


@pytest.fixture(scope="module")
def sock_dir() -> Iterator[Path]:
    """A short private directory: unix socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def executor_argv(model: Path, address: str, *options: str) -> list[str]:
    """float32 unless options say otherwise (a later --dtype wins)."""
    return ["executor", str(model), "--listen", address, "--block-size", str(BLOCK_SIZE),
            "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-model-len", str(MAX_MODEL_LEN),
            "--dtype", "float32", *options]


def scheduler_argv(executor_address: str, address: str) -> list[str]:
    return ["scheduler", "--executor", executor_address, "--listen", address,
            "--drain-timeout", "5"]


def start_executor(model: Path, address: str, log_dir: Path) -> Service:
    service = Service("executor", executor_argv(model, address), log_dir)
    service.wait_serving(address, EXECUTOR_SERVICE)
    return service


@contextlib.contextmanager
def executor_and_scheduler(model: Path, sock_dir: Path) -> Iterator[tuple[Service, Service]]:
    """Both started at once (the scheduler waits for the executor), stopped cleanly after."""
    executor_address = f"unix://{sock_dir}/executor.sock"
    scheduler_address = f"unix://{sock_dir}/scheduler.sock"
    executor = Service("executor", executor_argv(model, executor_address), sock_dir)
    scheduler = Service("scheduler", scheduler_argv(executor_address, scheduler_address),
                        sock_dir)
    try:
        executor.wait_serving(executor_address, EXECUTOR_SERVICE)
        scheduler.wait_serving(scheduler_address, SCHEDULER_SERVICE)
        yield executor, scheduler
        assert scheduler.stop() == 0, scheduler.log()
        if executor.proc.returncode is None:  # not killed by the test
            assert executor.stop() == 0, executor.log()
    finally:
        scheduler.kill()
        executor.kill()


# --- the workload shared by the tests, and its undisturbed in-process result -----------------------

MAX_TOKENS = 120
PROMPT_LENGTHS = (5, 17, 33, 48)  # across block boundaries; prompt + MAX_TOKENS <= MAX_MODEL_LEN


def prompts() -> dict[str, list[int]]:
    """Deterministic prompts of token ids (below the tiny tokenizer's 2048)."""
    return {f"req-{i}": [(97 * i + 31 * j + 7) % 2000 + 10 for j in range(n)]
            for i, n in enumerate(PROMPT_LENGTHS)}


@pytest.fixture(scope="session")
def reference_tokens(llama_dir: Path) -> dict[str, list[int]]:
    """Greedy tokens of `prompts()` from an in-process Executor + Scheduler, no network."""
    import torch

    from pagedserve.executor.config import ExecutorConfig
    from pagedserve.executor.executor import Executor
    from pagedserve.protos import executor_pb2
    from pagedserve.scheduler.config import SchedulerConfig
    from pagedserve.scheduler.driver import StepDriver
    from pagedserve.scheduler.scheduler import Scheduler

    torch.set_num_threads(1)  # as the service processes run (OMP_NUM_THREADS=1)
    executor = Executor(ExecutorConfig(
        model=str(llama_dir), dtype="float32", block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_KV_BLOCKS, max_model_len=MAX_MODEL_LEN))
    sched = Scheduler(SchedulerConfig.from_describe(executor.describe()))
    driver = StepDriver(sched, executor)
    for request_id, prompt in prompts().items():
        sched.add_request(request_id, prompt, executor_pb2.SamplingParams(),
                          max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in prompts()}
    while sched.has_unfinished():
        for delta in driver.step():
            tokens[delta.request_id] += delta.new_token_ids
    return tokens


@pytest.fixture(scope="module")
def served(llama_dir: Path, sock_dir: Path) -> Iterator[dict]:
    """executor, scheduler and router processes: name -> (address, Service)."""
    with executor_and_scheduler(llama_dir, sock_dir) as (executor, scheduler):
        # Ports the router binds itself (0) and logs: a port picked here could be taken first.
        router = Service("router", ["router", "--model", str(llama_dir), "--scheduler",
                                    f"unix://{sock_dir}/scheduler.sock", "--port", "0",
                                    "--grpc-port", "0"], sock_dir)
        try:
            _, port = router_ports(router.proc, router.log_path)
            router.wait_serving(f"127.0.0.1:{port}")
            yield {"executor": (f"unix://{sock_dir}/executor.sock", executor),
                   "scheduler": (f"unix://{sock_dir}/scheduler.sock", scheduler),
                   "router": (f"127.0.0.1:{port}", router)}
            assert router.stop() == 0, router.log()
        finally:
            router.kill()
