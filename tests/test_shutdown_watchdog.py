"""pagedserve/shutdown_watchdog.py in a real process whose teardown hangs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from tests.conftest import ROOT

HANGS = textwrap.dedent("""
    import asyncio, time
    from pagedserve.shutdown_watchdog import ShutdownWatchdog

    async def hung_teardown():
        time.sleep(60)  # a teardown blocked in a library call, the event loop with it

    async def waits_forever():
        await asyncio.Event().wait()

    async def main():
        asyncio.get_running_loop().create_task(waits_forever(), name="left-behind")
        ShutdownWatchdog("probe", seconds=0.5).arm(exit_code=3)
        await hung_teardown()

    asyncio.run(main())
""")


def test_a_hung_teardown_ends_with_its_exit_code_and_the_stacks_that_hung() -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HANGS], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert time.monotonic() - start < 20
    assert proc.returncode == 3, proc.stderr
    assert "shutdown overran" in proc.stdout + proc.stderr
    # the main thread's stack (faulthandler) and the tasks' (asyncio) name where it hung
    assert "hung_teardown" in proc.stderr
    assert "left-behind" in proc.stderr and "waits_forever" in proc.stderr


def test_a_prompt_teardown_exits_normally_before_the_bound() -> None:
    quick = HANGS.replace("time.sleep(60)", "pass").replace("seconds=0.5", "seconds=30")
    quick = quick.replace("await hung_teardown()", "await hung_teardown(); raise SystemExit(0)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", quick], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 20  # the daemon watchdog did not hold the process
    assert "shutdown overran" not in proc.stdout + proc.stderr



def test_a_teardown_that_holds_the_gil_still_ends_through_faulthandler() -> None:
    """A C call that keeps the GIL (ctypes.PyDLL does not release it) stops the Python watchdog
    thread too; faulthandler's C timer dumps the stacks and exits 1 anyway."""
    holds_gil = HANGS.replace("time.sleep(60)", "import ctypes; ctypes.PyDLL(None).sleep(60)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", holds_gil], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert proc.returncode == 1, proc.stderr
    assert "shutdown overran" not in proc.stdout + proc.stderr  # that thread never ran
    assert "hung_teardown" in proc.stderr
