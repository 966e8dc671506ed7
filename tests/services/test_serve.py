"""`pagedserve serve`: three supervised children; a dead one is restarted; SIGTERM leaves nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pagedserve.health import grpc_serving
from tests.conftest import ROOT
from tests.services.conftest import MAX_MODEL_LEN, NUM_KV_BLOCKS

pytest.importorskip("pagedserve.router.server", reason="the router is not written yet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of the live processes whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what}: serve exited with {proc.poll()} or timed out:\n"
                        f"{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)


def http_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return 0, {}


def test_serve_restarts_a_dead_executor_and_exits_cleanly(llama_dir: Path, tmp_path: Path) -> None:
    port = free_port()  # serve's supervisor probes this port: it cannot be 0 (e2e/conftest.py)
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "pagedserve.cli", "serve", str(llama_dir), "--port", str(port),
            "--grpc-port", "0", "--num-kv-blocks", str(NUM_KV_BLOCKS),
            "--max-model-len", str(MAX_MODEL_LEN), "--drain-timeout", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    completion = {"model": str(llama_dir), "prompt": "def main():", "max_tokens": 6}
    try:
        wait_for(lambda: "pagedserve is ready" in log.read_text(errors="replace"), 60,
                 "ready", proc, log)
        assert f"http://127.0.0.1:{port}/v1" in log.read_text()
        status, body = http_json(f"{base}/v1/completions", completion)
        assert status == 200 and body["usage"]["completion_tokens"] == 6, body
        children = children_of(proc.pid)
        assert sorted(re.search(r"pagedserve\.cli (\w+)", c)[1] for c in children.values()) \
            == ["executor", "router", "scheduler"]
        sock_dir = re.search(r"unix://(\S+)/executor\.sock", " ".join(children.values()))[1]

        executor = next(pid for pid, c in children.items() if "cli executor" in c)
        os.kill(executor, signal.SIGKILL)
        executor_address = f"unix://{sock_dir}/executor.sock"
        wait_for(lambda: executor not in children_of(proc.pid) and len(children_of(proc.pid)) == 3
                 and grpc_serving(executor_address, "pagedserve.v1.Executor")
                 and http_json(f"{base}/health")[0] == 200, 60, "executor restarted", proc, log)
        status, again = http_json(f"{base}/v1/completions", completion)
        assert status == 200, (status, again)
        assert again["choices"][0]["text"] == body["choices"][0]["text"]

        children = children_of(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:  # a failed test: still let serve clean up its socket dir
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert not [pid for pid in children if alive(pid)], "orphaned children"
    assert not Path(sock_dir).exists()
