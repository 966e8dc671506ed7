"""A supervised child dies with its supervisor (Linux), and gets its niceness without a
preexec_fn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]

# The supervisor: starts a child through serve.Child, prints its pid, then waits to be killed.
# The child creates the file named by argv[1] once die_with_supervisor() has run.
SUPERVISOR = """
import sys, time
from pagedserve.serve import Child, ServiceSpec
child_code = "import sys, time; from pagedserve.lifeline import die_with_supervisor; " \\
             "die_with_supervisor(); open(sys.argv[1], 'w').close(); time.sleep(120)"
child = Child(ServiceSpec("probe", [sys.executable, "-c", child_code, sys.argv[1]], "unused"))
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
def test_a_child_dies_with_its_supervisor(tmp_path: Path) -> None:
    armed = tmp_path / "armed"
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(armed)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
    child = next(int(line.split()[1]) for line in supervisor.stdout if line.startswith("child "))
    try:
        wait_until(armed.exists, 30, "the child past its die_with_supervisor()", proc=supervisor)
        assert _alive(child)
        supervisor.kill()
        supervisor.wait()
        wait_until(lambda: not _alive(child), 10, "the child dying with its supervisor")
    finally:
        supervisor.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)
