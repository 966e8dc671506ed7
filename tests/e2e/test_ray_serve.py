"""`pagedserve serve --distributed-executor-backend ray --tensor-parallel-size 2`
(executor/rank_launch.py) on a Ray head this module starts: the same greedy completions as one
rank in-process; the Ray actor rank killed with SIGKILL mid-stream ends its executor, which the
supervisor restarts on a fresh placement group, and every request completes; once serve has
stopped, nothing of it is left in the cluster. A Ray rank that cannot load is named."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import free_port
from tests.e2e.rank_failover import PROMPTS, kill_mid_stream, one_rank_texts, ranked_serve
from tests.waiting import wait_until

pytest.importorskip("ray", reason="ray is not installed (the dev extra and requirements.lock "
                                  "have it: `make install`)")

pytestmark = pytest.mark.timeout(300)

HEAD_CPUS = 4  # logical: two bundles of one CPU each (2 cores // 2 ranks), and room for a restart
HEAD_START_S = 60.0


@dataclass
class RayHead:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A one-node Ray cluster of our own: its own temp dir (short: Ray's unix socket paths must
    fit) and ports, `ray start --block` in a new session, so SIGTERM to it stops exactly this
    cluster (never `ray stop`, which would stop every Ray on the machine) and a kill of its
    process group catches whatever is left."""
    temp = tempfile.mkdtemp(prefix="psray-", dir="/tmp")
    port = free_port()
    argv = [_ray_bin(), "start", "--head", "--block", "--port", str(port),
            "--num-cpus", str(HEAD_CPUS), "--object-store-memory", "100000000",
            "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp,
            "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port())]
    log_path = Path(temp) / "head.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(proc, f"127.0.0.1:{port}", log_path)
    try:
        wait_until(lambda: "Ray runtime started" in log_path.read_text(errors="replace"),
                   HEAD_START_S, "the Ray head", proc=proc, log=head.log)
        yield head
    finally:
        _stop_head(head, temp)


def _stop_head(head: RayHead, temp: str) -> None:
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):  # then killed below
        head.proc.wait(30)
    for pid in _in_session(head.proc.pid):  # raylet, GCS, workers: anything left
        os.kill(pid, signal.SIGKILL)
    if head.proc.poll() is None:
        head.proc.wait(5)
    shutil.rmtree(temp, ignore_errors=True)


def _in_session(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid` (the raylet gives each worker a process
    group of its own, but they stay in the head's session)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(proc.name))
    return found


def _rank_actors(head: RayHead) -> list[int]:
    """Pids of the cluster's RankActor workers (Ray titles a worker process after its actor)."""
    found = []
    for pid in _in_session(head.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::RankActor"):
            found.append(pid)
    return found


CLUSTER_STATE = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 20
while True:
    free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
    groups = [g["state"] for g in ray.util.placement_group_table().values()]
    if (free == total and all(s == "REMOVED" for s in groups)) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(free, total, groups)
"""


def _cluster_state(head: RayHead) -> str:
    """CPUs free and in all, and every placement group's state, once all CPUs are free (or 20 s)."""
    out = subprocess.run([sys.executable, "-c", CLUSTER_STATE, head.address], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


def test_serve_on_ray_matches_one_rank_and_survives_a_killed_actor(
        ray_head: RayHead, llama_dir: Path, tmp_path: Path) -> None:
    want = one_rank_texts(llama_dir)
    with ranked_serve(llama_dir, tmp_path / "serve.log", "--tensor-parallel-size", "2",
                      "--distributed-executor-backend", "ray",
                      "--ray-address", ray_head.address) as (server, client, complete):
        assert [complete(p) for p in PROMPTS] == want
        (actor,) = _rank_actors(ray_head)
        log = kill_mid_stream(server, client, complete, actor, want)
        assert "tensor-parallel rank 1 died" in log, log[-20000:]
        assert "tensor-parallel ranks placed on Ray" in log
        assert _rank_actors(ray_head) not in ([], [actor])  # the restarted executor's own rank
    # serve stopped: its actors are gone and its placement groups removed, all CPUs free again
    free, total, groups = _cluster_state(ray_head).split(" ", 2)
    assert free == total == f"{float(HEAD_CPUS)}", (free, total, groups)
    assert "CREATED" not in groups and "PENDING" not in groups, groups
    assert _rank_actors(ray_head) == []


def test_a_ray_rank_that_cannot_load_is_named(ray_head: RayHead, tmp_path: Path) -> None:
    """The actor's load() returns the error; rank 0 raises it naming the rank, and stop()
    leaves nothing in the cluster."""
    from pagedserve.executor.config import ExecutorConfig
    from pagedserve.executor.rank_launch import RayLauncher

    config = ExecutorConfig(model=str(tmp_path / "no-such-model"), tensor_parallel_size=2,
                            distributed_executor_backend="ray", ray_address=ray_head.address)
    import ray

    handler = signal.getsignal(signal.SIGTERM)
    launcher = RayLauncher(config.ray_address)
    try:
        assert signal.getsignal(signal.SIGTERM) is handler  # ray.init's own one is undone
        launcher.start(config, 2, free_port(), 1)
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1: .*no-such-model"):
            launcher.wait_ready(1, 60)
    finally:
        launcher.stop(graceful=False)
    assert not ray.is_initialized()  # it joined the cluster, so it left it
    free, total, _ = _cluster_state(ray_head).split(" ", 2)
    assert free == total
