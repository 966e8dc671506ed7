"""A supervised child dies with its supervisor (Linux), and gets its niceness without a
preexec_fn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The supervisor: starts a child through serve.Child, prints its pid, then waits to be killed.
SUPERVISOR = """
import sys, time
from pagedserve.serve import Child, ServiceSpec
child_code = "from pagedserve.lifeline import die_with_supervisor; die_with_supervisor(); " \\
             "import time; time.sleep(120)"
child = Child(ServiceSpec("probe", [sys.executable, "-c", child_code], "unused"))
child.start()
print("child", child.proc.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_supervisor() -> None:
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
    child = next(int(line.split()[1]) for line in supervisor.stdout if line.startswith("child "))
    try:
        time.sleep(1.0)  # the child is past its die_with_supervisor()
        assert _alive(child)
        supervisor.kill()
        supervisor.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its supervisor"
    finally:
        supervisor.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)
