"""A bound on a server's teardown, once its requests are drained.

After the last request is answered, what remains of a stop is library teardown: gRPC's server
shutdown, cancelling tasks, closing channels, the event loop's own cleanup. Rarely (about one CI
run in three, never reproduced alone) the scheduler's got stuck there for more than 10 s. Nothing
is owed to anyone by then, so rather than hang until a supervisor's SIGKILL, a watchdog thread
armed at that point writes every thread's stack and every asyncio task's to stderr (the service's
log: the next occurrence names its cause) and ends the process with the exit code it meant to
return. A thread stuck in a C call that holds the GIL would stop that thread too, so
faulthandler's own timer (a C thread, no GIL needed) backs it up a little later: the stacks
again, and exit status 1.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
import threading
import time

import structlog

log = structlog.get_logger("pagedserve.shutdown_watchdog")

TEARDOWN_BOUND_S = 5.0  # gRPC's 1 s grace, then cancelled tasks and closed channels: well under
BACKSTOP_AFTER_S = 2.0  # faulthandler's timer, this long after the bound


class ShutdownWatchdog:
    """`arm()` once the drain is done. Never disarmed: a daemon thread dies with a process that
    exits in time, and one whose interpreter teardown hangs is bounded too."""

    def __init__(self, name: str, seconds: float = TEARDOWN_BOUND_S) -> None:
        self.name = name
        self.seconds = seconds
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self, exit_code: int = 0) -> None:
        """Starts the countdown; `exit_code` is what the process exits with if it expires."""
        self.exit_code = exit_code
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        threading.Thread(target=self._expire, name=f"{self.name}-watchdog", daemon=True).start()
        faulthandler.dump_traceback_later(self.seconds + BACKSTOP_AFTER_S, exit=True,
                                          file=sys.stderr)

    def _expire(self) -> None:
        time.sleep(self.seconds)
        log.warning("shutdown overran its bound after the drain; exiting with the stacks below",
                    process=self.name, bound_s=self.seconds, exit_code=self.exit_code)
        sys.stdout.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self._dump_tasks()
        sys.stderr.flush()
        os._exit(self.exit_code)

    def _dump_tasks(self) -> None:
        """The event loop's tasks, read from this thread: racy, but only ever read, at the end."""
        if self._loop is None:
            return
        try:
            tasks = list(asyncio.all_tasks(self._loop))
        except RuntimeError:  # the set changed while it was copied
            return
        for task in tasks:
            print(f"--- asyncio task {task.get_name()} ---", file=sys.stderr)
            try:
                task.print_stack(file=sys.stderr)
            except Exception as e:  # a frame changed under the read
                print(f"(stack unreadable: {e!r})", file=sys.stderr)
