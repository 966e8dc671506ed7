"""/health against a real scheduler process: 503 while its executor is unreachable, 503 once the
scheduler itself is gone (the router alone stays up and says why)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from pagedserve.router.server import RouterThread
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)


def wait_for(url: str, status: str, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url, timeout=2)
        if r.json()["status"] == status:
            return r
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)


def test_health_is_503_without_an_executor_or_a_scheduler(llama_dir, tmp_path) -> None:
    sock = f"unix://{tmp_path}/scheduler.sock"
    argv = [sys.executable, "-m", "pagedserve.cli", "scheduler", "--listen", sock,
            "--executor", f"unix://{tmp_path}/no-executor.sock", "--drain-timeout", "1"]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with RouterThread(llama_dir, sock) as router:
            url = router.base_url + "/health"
            r = wait_for(url, "executor not connected")
            assert r.status_code == 503
            proc.terminate()
            proc.wait(timeout=20)
            r = wait_for(url, "scheduler unreachable")
            assert r.status_code == 503
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
