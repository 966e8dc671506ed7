"""scripts/gpu_check.sh, as far as a CPU can run it: the plan (--dry-run), its arguments, and the
step runner's timeouts and result files (scripts/gpu_steps.sh), so a rare GPU window is spent
measuring, not debugging the script."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OUT": str(out), **env})


def test_dry_run_lists_every_step_with_its_timeout_and_log(tmp_path: Path) -> None:
    proc = _run(["--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("env", "model", "kernels", "kbench", "throughput", "sweep"):
        assert f"== {name} " in proc.stdout and f"{tmp_path}/{name}.log" in proc.stdout
    assert '-m triton or cuda' in proc.stdout and "--skip-roofline" in proc.stdout
    assert "--hf-batch-sizes 64 " in proc.stdout  # transformers at one batch size
    timeouts = [int(line.split("timeout ")[1].split("s)")[0]) for line in proc.stdout.splitlines()
                if line.startswith("== ") and "timeout" in line]
    assert all(t <= 540 for t in timeouts), timeouts
    assert not list(tmp_path.glob("*.log")), "a dry run runs nothing"


def test_bad_arguments_and_no_gpu_exit_2(tmp_path: Path) -> None:
    assert _run(["--bogus"], tmp_path).returncode == 2
    assert _run(["--budget", "soon"], tmp_path).returncode == 2
    no_gpu = _run([], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert no_gpu.returncode == 2 and "no CUDA device" in no_gpu.stderr


def _steps(script: str, out: Path, budget: int = 60) -> subprocess.CompletedProcess:
    code = f"OUT={out} BUDGET={budget}; source scripts/gpu_steps.sh; {script}; echo STATUS=$STATUS"
    return subprocess.run(["bash", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_step_writes_its_log_as_it_goes_and_a_summary(tmp_path: Path) -> None:
    proc = _steps("step hello 10 echo hi there", tmp_path)
    assert "STATUS=0" in proc.stdout
    assert (tmp_path / "hello.log").read_text() == "hi there\n"
    assert (tmp_path / "summary.txt").read_text().startswith("hello rc=0 seconds=")


def test_a_step_past_its_timeout_is_stopped_and_the_run_goes_on(tmp_path: Path) -> None:
    proc = _steps("step slow 1 bash -c 'echo started; sleep 30'; step next 10 echo after", tmp_path)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("slow rc=124 seconds=1")
    assert (tmp_path / "slow.log").read_text() == "started\n"  # partial output kept
    assert summary[1].startswith("next rc=0")
    assert "STATUS=1" in proc.stdout


def test_a_spent_budget_skips_the_remaining_steps(tmp_path: Path) -> None:
    proc = _steps("sleep 3; step late 100 echo never", tmp_path, budget=4)
    assert "late skipped" in (tmp_path / "summary.txt").read_text()
    assert not (tmp_path / "late.log").exists() and "STATUS=1" in proc.stdout
