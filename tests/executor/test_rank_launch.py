"""The rank launchers' error paths (executor/rank_launch.py), none needing a Ray cluster: a rank
that cannot load is named; the ray backend without ray, or without a cluster at its address, is
refused naming the option. The ray backend on a real cluster: tests/e2e/test_ray_serve.py."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pagedserve import LLM
from pagedserve.executor import rank_launch
from pagedserve.executor.config import ExecutorConfig
from pagedserve.serve import build_specs
from tests.conftest import model_dir

pytestmark = pytest.mark.timeout(120)


def _closed_port() -> int:
    """A port nothing listens on (bound a moment ago, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_mp_rank_that_cannot_load_is_named(tmp_path: Path) -> None:
    config = ExecutorConfig(model=str(tmp_path / "gone"), tensor_parallel_size=2)
    launcher = rank_launch.MpLauncher()
    try:
        launcher.start(config, 2, _closed_port(), 1)
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1: .*config\.json"):
            launcher.wait_ready(1, 60)
    finally:
        launcher.stop(graceful=False)
    assert launcher.procs == []


def test_the_rank_that_broke_the_group_is_named_not_one_that_left_after_it() -> None:
    """Rank 1 left because the group broke under it (GROUP_LOST_EXIT), rank 2 was killed: rank 2
    is named though rank 1's number is lower; with only ranks that left, the lowest is."""
    import signal
    import subprocess

    def ended(code: int | None) -> subprocess.Popen:
        script = "import time; time.sleep(60)" if code is None else f"raise SystemExit({code})"
        proc = subprocess.Popen([sys.executable, "-c", script])
        if code is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        return proc

    launcher = rank_launch.MpLauncher()
    launcher.procs = [ended(rank_launch.GROUP_LOST_EXIT), ended(None)]
    assert launcher.dead_rank() == "tensor-parallel rank 2 died (exit code -9)"
    launcher.procs = [ended(rank_launch.GROUP_LOST_EXIT), ended(rank_launch.GROUP_LOST_EXIT)]
    assert launcher.dead_rank() == "tensor-parallel rank 1 died (exit code 3)"
    launcher.procs = []
    assert launcher.dead_rank() is None


def test_a_rank_value_error_is_raised_as_it_is() -> None:
    """A ValueError names the option at fault, not the rank (rank 0 most likely failed the
    same way); any other error names the rank."""
    with pytest.raises(ValueError, match=r"^max_model_len: too long$"):
        rank_launch.raise_load_error(2, {"error": "max_model_len: too long", "type": "ValueError"})
    with pytest.raises(RuntimeError, match=r"^tensor-parallel rank 2: disk on fire$"):
        rank_launch.raise_load_error(2, {"error": "disk on fire", "type": "OSError"})
    rank_launch.raise_load_error(2, {"ready": True, "weight_bytes": 1})


def test_the_backend_is_checked() -> None:
    with pytest.raises(ValueError, match="distributed_executor_backend: must be one of"):
        ExecutorConfig(model="m", distributed_executor_backend="mpi")
    with pytest.raises(ValueError, match="ray_address"):
        ExecutorConfig(model="m", ray_address="")


def test_ray_missing_is_refused_naming_the_backend(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ValueError, match="distributed_executor_backend: 'ray' needs the ray"):
        LLM(str(model_dir("llama")), tensor_parallel_size=2, distributed_executor_backend="ray")


@pytest.fixture
def ray_importable() -> None:
    pytest.importorskip("ray", reason="ray is not installed (`make install` installs it)")


def test_no_cluster_at_the_address(ray_importable) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(RuntimeError, match=f"ray_address: no Ray cluster at {address}"):
        LLM(str(model_dir("llama")), tensor_parallel_size=2, distributed_executor_backend="ray",
            ray_address=address)


def test_auto_honours_RAY_ADDRESS(ray_importable, monkeypatch) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert rank_launch.resolve_ray_address("auto") == address
    assert rank_launch.resolve_ray_address("10.0.0.1:6379") == "10.0.0.1:6379"
    with pytest.raises(RuntimeError, match=f"no Ray cluster at {address}"):
        rank_launch.RayLauncher("auto")


def test_ray_client_and_malformed_addresses_are_refused(ray_importable) -> None:
    with pytest.raises(ValueError, match="Ray Client address"):
        rank_launch.RayLauncher("ray://10.0.0.1:10001")
    with pytest.raises(ValueError, match="ray_address: must be 'auto' or the cluster's host:port"):
        rank_launch.RayLauncher("somewhere")


def test_serve_passes_the_backend_to_its_executor() -> None:
    from pagedserve.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--tensor-parallel-size", "2",
                                      "--distributed-executor-backend", "ray",
                                      "--ray-address", "10.0.0.1:6379"])
    executor = build_specs(args, "m", "/tmp/x")[0].argv
    i = executor.index("--distributed-executor-backend")
    assert executor[i + 1] == "ray"
    assert executor[executor.index("--ray-address") + 1] == "10.0.0.1:6379"
    args = build_parser().parse_args(["serve", "m"])  # unset: the executor's own defaults
    assert "--distributed-executor-backend" not in build_specs(args, "m", "/tmp/x")[0].argv
