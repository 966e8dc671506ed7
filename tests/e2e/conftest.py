"""One real `pagedserve serve` for the e2e tests, and transformers' greedy reference on the same
weights.

The `serve` fixture (package-scoped: every e2e module shares one server) starts the supervisor (executor, scheduler and router as child processes over
unix sockets) on free ports, waits for its ready line, and at teardown sends SIGTERM and checks that
it exits with 0 and leaves no process and no socket directory behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, model_dir
from tests.waiting import router_ports

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
NUM_KV_BLOCKS = 256  # 16 tokens each: room for the long dropped stream and a few short requests
MAX_MODEL_LEN = 2048


def free_port() -> int:
    """A port free a moment ago. Only for `serve`'s HTTP port: its supervisor probes the router's
    /health at the port given on the command line, so port 0 cannot work there without the
    router reporting its bound port back to the supervisor. Everything that can bind port 0
    does (serve's gRPC port, a standalone router: tests/waiting.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, pgrp, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of the live processes whose parent is `pid`."""
    found = {}
    for child in _pids():
        stat = _proc_stat(child)
        if stat is None or int(stat[1]) != pid:
            continue
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def live_in_groups(pgids: set[int]) -> list[int]:
    """Live (not zombie) processes whose process group is one of `pgids` (each child leads its
    own session, so this finds the children and anything they spawned)."""
    return [pid for pid in _pids()
            if (stat := _proc_stat(pid)) is not None and stat[0] != "Z" and int(stat[2]) in pgids]


def metrics(base_url: str) -> dict[str, float]:
    """The router's unlabelled Prometheus samples, e.g. {'kv_cache_blocks_free': 256.0, ...}."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^pagedserve_(\w+) (\S+)$", text, re.M)}


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    log_path: Path
    model: Path
    port: int
    grpc_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _wait_ready(serve: Serve, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while "pagedserve is ready" not in serve.log_path.read_text(errors="replace"):
        if serve.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"serve exited with {serve.proc.poll()} or was not ready in "
                        f"{timeout_s}s:\n{serve.log()}")
        time.sleep(0.1)


@contextlib.contextmanager
def running_serve(args: list[str], log_path: Path, model: Path, *,
                  env: dict[str, str] | None = None,
                  startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[Serve]:
    """`pagedserve serve ARGS --port P` (model is what it serves, for the record) until ready;
    stopped by SIGTERM after, which must exit 0. The HTTP port is picked here (free_port says
    why not port 0)."""
    port = free_port()
    argv = [sys.executable, "-m", "pagedserve.cli", "serve", *args, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    serve = Serve(proc, log_path, model, port, -1)
    try:
        _wait_ready(serve, startup_timeout_s)
        yield serve
    finally:
        rc = _stop(serve)
    assert rc == 0, serve.log()


def _stop(serve: Serve) -> int | None:
    """SIGTERM and wait; a serve that does not stop in time is killed (group and all)."""
    if serve.proc.poll() is None:
        serve.proc.send_signal(signal.SIGTERM)
    try:
        return serve.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait()
        return None


@pytest.fixture(scope="session")
def llama_dir() -> Path:
    return model_dir("llama")


@pytest.fixture(scope="package")
def serve(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    argv = [sys.executable, "-m", "pagedserve.cli", "serve", str(llama_dir), "--port", str(port),
            "--grpc-port", "0", "--dtype", "float32",
            "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-model-len", str(MAX_MODEL_LEN),
            "--drain-timeout", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Serve(proc, log_path, llama_dir, port, 0)
    try:
        _wait_ready(server)
        # The router child logs the gRPC port it bound (port 0) into serve's log.
        http_port, server.grpc_port = router_ports(proc, log_path)
        assert http_port == port
        children = children_of(proc.pid)
        assert sorted(re.search(r"pagedserve\.cli (\w+)", c)[1] for c in children.values()) \
            == ["executor", "router", "scheduler"], children
        sock_dir = re.search(r"unix://(\S+)/executor\.sock", " ".join(children.values()))[1]
        yield server
        assert children_of(proc.pid).keys() == children.keys(), "a child was restarted"
    finally:
        rc = _stop(server)
    assert rc == 0, f"serve exited with {rc} on SIGTERM:\n{server.log()}"
    assert not live_in_groups(set(children)), "orphaned processes after serve exited"
    assert not Path(sock_dir).exists(), "serve left its socket directory behind"


@dataclass
class Reference:
    """transformers' greedy continuation of a prompt: its new token ids and their text."""
    prompt_ids: list[int]
    token_ids: list[int]
    text: str


class HF:
    """transformers on the same weights, float32, one thread (the server has the other core)."""

    def __init__(self, model: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self._cache: dict[tuple[tuple[int, ...], int], Reference] = {}
        self._logprobs: dict[tuple[tuple[int, ...], int], tuple[list[int], object]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int) -> Reference:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in self._cache:
            ids = self.torch.tensor([prompt_ids])
            with self.torch.no_grad():
                out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids),
                                          do_sample=False, max_new_tokens=max_new_tokens,
                                          min_new_tokens=max_new_tokens)
            new = out[0, len(prompt_ids):].tolist()
            assert len(new) == max_new_tokens
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            self._cache[key] = Reference(list(prompt_ids), new, text)
        return self._cache[key]

    def greedy(self, prompt: str, max_new_tokens: int) -> Reference:
        return self.greedy_ids(self.prompt_ids(prompt), max_new_tokens)

    def greedy_logprobs(self, prompt_ids: list[int], max_new_tokens: int
                        ) -> tuple[list[int], object]:
        """Greedy token ids and, per position, log_softmax of the raw logits ([N, V] tensor)."""
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in self._logprobs:
            torch = self.torch
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                out = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                    output_logits=True, return_dict_in_generate=True)
            logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
            self._logprobs[key] = (out.sequences[0, len(prompt_ids):].tolist(), logprobs)
        return self._logprobs[key]


@pytest.fixture(scope="package")
def hf(llama_dir: Path) -> HF:
    return HF(llama_dir)
