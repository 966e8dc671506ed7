"""`pagedserve serve`: router, scheduler and executor on one machine, as supervised processes.

    supervisor ──spawns──> executor   unix://TMP/executor.sock
               ──spawns──> scheduler  unix://TMP/scheduler.sock  (connects to the executor)
               ──spawns──> router     http://HOST:PORT, gRPC HOST:GRPC_PORT (connects to the scheduler)

The children share a private temporary directory (mode 0700) for their sockets. The supervisor waits
until every child reports healthy, prints the URLs, and restarts a child that dies: a new executor is
refilled by the scheduler's recompute, so no request is lost. On SIGINT or SIGTERM it stops the router
first (it stops accepting and drains its streams), then the scheduler, then the executor. Children
run in their own sessions (a terminal's Ctrl-C reaches only the supervisor, which orders the
shutdown) and, on Linux, get SIGKILL if the supervisor itself dies (PR_SET_PDEATHSIG, see pagedserve/lifeline.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import structlog

from pagedserve.health import probe
from pagedserve.lifeline import PARENT_PID_ENV

API_KEY_ENV = "PAGEDSERVE_API_KEY"  # the router's key travels in its environment, not its argv

log = structlog.get_logger("pagedserve.serve")

RESTART_WINDOW_S = 60.0
MODEL_ERROR_EXIT = 2  # a child's status for "cannot load the model" (pagedserve/cli.py)
MAX_RESTARTS_IN_WINDOW = 5


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: list[str]
    health_target: str  # a gRPC address, or an http:// URL
    health_service: str = ""
    stop_timeout: float = 10.0  # SIGTERM, then this long before SIGKILL
    env: dict[str, str] | None = None  # added to the supervisor's environment (secrets: not argv)
    nice: int = 0  # added to the child's niceness (lower priority) when it starts


def _add_niceness(pid: int, nice: int) -> None:
    """Lowers a just-started child's priority from here: Linux keeps niceness per thread, and the
    child has not started its threads yet, so they inherit it."""
    if nice > 0:
        with contextlib.suppress(OSError):  # it may already have exited
            os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, pid) + nice)


class Child:
    """One supervised process, started in its own session."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: deque[float] = deque(maxlen=MAX_RESTARTS_IN_WINDOW + 1)

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        env = {**os.environ, **(self.spec.env or {}), PARENT_PID_ENV: str(os.getpid())}
        self.proc = subprocess.Popen(self.spec.argv, start_new_session=True, env=env)
        _add_niceness(self.proc.pid, self.spec.nice)
        self.starts.append(time.monotonic())
        log.info("started", child=self.name, pid=self.proc.pid)

    def returncode(self) -> int | None:
        """The exit status once the process has exited; None while it runs (or never started)."""
        return None if self.proc is None else self.proc.poll()

    def healthy(self) -> bool:
        return self.returncode() is None and probe(self.spec.health_target,
                                                   self.spec.health_service)

    def stop(self, force: threading.Event) -> None:
        """SIGTERM, wait up to stop_timeout (less once `force` is set), then SIGKILL the group."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            log.info("stopping", child=self.name, pid=proc.pid)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.spec.stop_timeout
            while proc.poll() is None and time.monotonic() < deadline and not force.is_set():
                time.sleep(0.05)
            if proc.poll() is None:
                log.warning("did not stop in time; killing", child=self.name, pid=proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the leader and anything it spawned
        proc.wait()


class Supervisor:
    """Starts children, waits until all are healthy, restarts the dead, stops them in reverse."""

    def __init__(self, specs: list[ServiceSpec], *, ready_message: str = "",
                 startup_timeout: float = 600.0) -> None:
        self.children = [Child(s) for s in specs]
        self.ready_message = ready_message
        self.startup_timeout = startup_timeout
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._force = threading.Event()

    def request_stop(self) -> None:
        if self._stop.is_set():
            self._force.set()  # a second Ctrl-C: stop waiting for drains
        self._stop.set()

    def run(self) -> int:
        """Runs until stopped (0) or until a child cannot be kept alive or never got healthy (1)."""
        previous = {s: signal.signal(s, lambda *_: self.request_stop())
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                child.start()
            return self._watch()
        finally:
            self._shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _watch(self) -> int:
        deadline = time.monotonic() + self.startup_timeout
        while not self._stop.is_set():
            for child in self.children:
                rc = child.returncode()
                if rc is not None and not self._stop.is_set() and not self._restart(child, rc):
                    return 1
            if not self.ready.is_set():
                if all(child.healthy() for child in self.children):
                    self._announce()
                elif time.monotonic() > deadline:
                    log.error("children not healthy in time", timeout_s=self.startup_timeout)
                    return 1
            self._stop.wait(0.25 if not self.ready.is_set() else 0.5)
        return 0

    def _announce(self) -> None:
        self.ready.set()
        log.info("all services healthy")
        if self.ready_message:
            print(self.ready_message, flush=True)

    def _restart(self, child: Child, rc: int) -> bool:
        if rc == MODEL_ERROR_EXIT:  # it printed why (a bad model path or file); a retry won't help
            log.error("child cannot start; not restarting", child=child.name, returncode=rc)
            return False
        now = time.monotonic()
        recent = [t for t in child.starts if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS_IN_WINDOW:
            log.error("child keeps dying; giving up", child=child.name, returncode=rc,
                      starts_in_window=len(recent), window_s=RESTART_WINDOW_S)
            return False
        delay = min(0.25 * 2 ** (len(recent) - 1), 5.0)
        log.warning("child exited; restarting", child=child.name, returncode=rc, delay_s=delay)
        if self._stop.wait(delay):
            return True
        child.start()
        return True

    def _shutdown(self) -> None:
        log.info("shutting down")
        for child in reversed(self.children):
            child.stop(self._force)
        log.info("all services stopped")


# --- `pagedserve serve` ----------------------------------------------------------------------------


def _flags(pairs: dict[str, object]) -> list[str]:
    """--flag value for each value that is set; a True bool gives a bare --flag."""
    argv: list[str] = []
    for flag, value in pairs.items():
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _spec_json(config: object) -> str | None:
    """The scheduler's and executor's --speculative-config value (serve parsed and checked it;
    the executor takes its draft model from it)."""
    return None if config is None else config.to_json()  # type: ignore[attr-defined]


def _scheme() -> str:
    """The router's HTTP scheme: HTTPS when serve has a certificate (its children inherit the
    TLS settings with its environment: protos/tls.py)."""
    from pagedserve.protos import tls

    return "https" if os.environ.get(tls.CERT_ENV) else "http"


def _probe_host(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def _child(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pagedserve.cli", *argv]


def build_specs(args: object, model: str, sock_dir: str) -> list[ServiceSpec]:
    """The three children of `serve`, in start order; `args` is the parsed `serve` namespace."""
    a = vars(args)
    executor_addr = f"unix://{sock_dir}/executor.sock"
    scheduler_addr = f"unix://{sock_dir}/scheduler.sock"
    log_level = ["--log-level", a["log_level"]]
    executor = _child("executor", model, "--listen", executor_addr, *log_level, *_flags({
        "--dtype": a["dtype"], "--device": a["device"], "--block-size": a["block_size"],
        "--num-kv-blocks": a["num_kv_blocks"],
        "--kv-cache-memory-bytes": a["kv_cache_memory_bytes"],
        "--kv-cache-dtype": a["kv_cache_dtype"],
        "--max-model-len": a["max_model_len"], "--max-num-seqs": a["max_num_seqs"],
        "--max-num-batched-tokens": a["max_num_batched_tokens"], "--seed": a["seed"],
        "--model-impl": a["model_impl"], "--trust-remote-code": a["trust_remote_code"],
        "--quantization": a.get("quantization"), "--batch-invariant": a.get("batch_invariant"),
        "--tensor-parallel-size": a.get("tensor_parallel_size"),
        "--pipeline-parallel-size": a.get("pipeline_parallel_size"),
        "--distributed-executor-backend": a.get("distributed_executor_backend"),
        "--ray-address": a.get("ray_address"),
        "--speculative-config": _spec_json(a.get("speculative_config"))}))
    scheduler = _child("scheduler", "--executor", executor_addr, "--listen", scheduler_addr,
                       *log_level, *_flags({
                           "--max-num-seqs": a["max_num_seqs"],
                           "--max-num-batched-tokens": a["max_num_batched_tokens"],
                           "--no-prefix-caching": a["no_prefix_caching"],
                           # said either way: the scheduler's own default must not decide
                           ("--async-scheduling" if a.get("async_scheduling", True)
                            else "--no-async-scheduling"): True,
                           "--speculative-config": _spec_json(a.get("speculative_config")),
                           "--step-timeout": a.get("step_timeout"),
                           "--drain-timeout": a["drain_timeout"]}))
    router = _child("router", "--scheduler", scheduler_addr, "--model", model,
                    "--host", a["host"], "--port", str(a["port"]),
                    "--grpc-port", str(a["grpc_port"]), *log_level,
                    *_flags({"--served-model-name": a["served_model_name"],
                             "--drain-timeout": a["drain_timeout"],
                             "--trust-request-chat-template": a["trust_request_chat_template"],
                             "--metrics-public": a.get("metrics_public"),
                             "--scheduler-resume-timeout": a.get("scheduler_resume_timeout"),
                             "--tool-call-parser": a.get("tool_call_parser"),
                             "--reasoning-parser": a.get("reasoning_parser"),
                             **_limit_flags(a)}))
    drain, nice = float(a["drain_timeout"]) + 5.0, int(a.get("frontend_nice") or 0)
    return [
        ServiceSpec("executor", executor, executor_addr, "pagedserve.v1.Executor"),
        ServiceSpec("scheduler", scheduler, scheduler_addr, "pagedserve.v1.Scheduler",
                    stop_timeout=drain, nice=nice),
        ServiceSpec("router", router, f"{_scheme()}://{_probe_host(a['host'])}:{a['port']}/health",
                    stop_timeout=drain, nice=nice,
                    env={API_KEY_ENV: a["api_key"]} if a.get("api_key") else None),
    ]


def _limit_flags(a: dict) -> dict[str, object]:
    """The router's request-limit flags that `serve` was given (None: the router's default)."""
    from pagedserve.router.limits import LIMIT_FIELDS

    return {f"--{name.replace('_', '-')}": a.get(name) for name, _, _ in LIMIT_FIELDS}


def run_serve(args: object) -> int:
    """`pagedserve serve`: supervise the three services until SIGINT or SIGTERM."""
    a = vars(args)
    if a["model"]:
        model = str(Path(a["model"]).expanduser())
    else:
        from pagedserve.real_model import real_model_path

        log.info("using the default model, SmolLM2-135M-Instruct (fetched on first use)")
        model = str(real_model_path())
    with tempfile.TemporaryDirectory(prefix="pagedserve-") as sock_dir:
        os.chmod(sock_dir, 0o700)
        specs = build_specs(args, model, sock_dir)
        host = _probe_host(a["host"])
        message = f"pagedserve is ready: model {model}\n  OpenAI API  http://{host}:{a['port']}/v1"
        if a["grpc_port"] >= 0:
            message += f"\n  gRPC API    {host}:{a['grpc_port']}  (pagedserve.v1.Generation)"
        return Supervisor(specs, ready_message=message).run()
