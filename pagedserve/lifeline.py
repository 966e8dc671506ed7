"""A supervised child's tie to its supervisor: on Linux, SIGKILL when the supervisor dies.

The child sets it up itself, first thing in `pagedserve.cli.main`, from the supervisor's pid in
its environment. (A preexec_fn would run Python between fork and exec, which is unsafe once the
supervisor has threads, and gRPC's health probes give it some: a restarted child crashed there.)
"""

from __future__ import annotations

import os
import signal
import sys

PARENT_PID_ENV = "PAGEDSERVE_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    """Ask for SIGKILL when the supervisor named in the environment dies; exit now if it already
    has. The variable is removed, so this process's own children do not inherit the tie."""
    pid = os.environ.pop(PARENT_PID_ENV, None)
    if pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(pid):  # the supervisor died before the tie was made
        os._exit(1)
