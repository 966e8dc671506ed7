"""The router's HTTP /health and gRPC health (Check and Watch) agree at every poll, from start.

Issue 27: gRPC health was refreshed every 5 s, so at start HTTP said 200 while gRPC said
NOT_SERVING for seconds. Here a router (production refresh interval) starts before its scheduler
and executor; a poller asks both fronts every POLL_S while the pair comes up, and again while the
executor is killed. A Watch stream must change with HTTP too (within a second).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.router.grpc_service import SERVICE_NAME
from pagedserve.router.server import RouterThread
from tests.services.conftest import executor_and_scheduler

POLL_S = 0.05
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Poller:
    """Asks HTTP /health and gRPC Check (server and Generation) in turn; a Watch alongside."""
    router: RouterThread
    polls: list[tuple[float, bool, bool, bool]] = field(default_factory=list)  # t, http, grpc x2
    watched: list[tuple[float, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Poller:
        self._channel = grpc.insecure_channel(self.router.grpc_address)
        self._stream = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest())
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._poll, self._watch)]
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self._stream.cancel()
        for t in self._threads:
            t.join(10)
        self._channel.close()

    def _poll(self) -> None:
        with httpx.Client(timeout=5) as http, grpc.insecure_channel(
                self.router.grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                t = time.monotonic()
                ok = http.get(self.router.base_url + "/health").status_code == 200
                served = [stub.Check(health_pb2.HealthCheckRequest(service=name),
                                     timeout=5).status == SERVING for name in ("", SERVICE_NAME)]
                self.polls.append((t, ok, *served))
                time.sleep(POLL_S)

    def _watch(self) -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled by close()
            for reply in self._stream:
                self.watched.append((time.monotonic(), reply.status == SERVING))

    def wait_for(self, state: bool, polls: int = 10, timeout: float = 60.0) -> None:
        """Until the last `polls` polls all saw `state` on HTTP."""
        deadline = time.monotonic() + timeout
        while not (len(self.polls) >= polls and all(p[1] == state for p in self.polls[-polls:])):
            assert time.monotonic() < deadline, self.polls[-5:]
            time.sleep(POLL_S)


def disagreements(polls: list[tuple[float, bool, bool, bool]]) -> list[int]:
    """Polls where the fronts differ, except a change caught between the HTTP and gRPC asks of
    one poll (then the next poll agrees on the new state)."""
    bad = []
    for i, (_, http, *grpc_states) in enumerate(polls):
        if all(s == http for s in grpc_states):
            continue
        after = polls[i + 1][1:] if i + 1 < len(polls) else None
        if after is None or len(set(after)) != 1 or after[0] != grpc_states[-1]:
            bad.append(i)
    return bad


def first_change(events: list[tuple[float, bool]], state: bool, since: float) -> float:
    return next(t for t, s in events if s == state and t >= since)


def test_http_and_grpc_health_agree_while_starting_and_losing_the_executor(
        llama_dir: Path, sock_dir: Path) -> None:
    scheduler = f"unix://{sock_dir}/scheduler.sock"
    with RouterThread(llama_dir, scheduler, grpc_port=0, health_interval_s=5.0) as router:
        poller = Poller(router).start()
        try:
            poller.wait_for(False, polls=5)
            with executor_and_scheduler(llama_dir, sock_dir) as (executor, _):
                poller.wait_for(True)
                executor.kill()
                poller.wait_for(False)
        finally:
            poller.close()
    polls = list(poller.polls)
    assert not disagreements(polls), [polls[i - 1:i + 2] for i in disagreements(polls)]
    up = next(t for t, http, *_ in polls if http)
    down = next(t for t, http, *_ in polls if t > up and not http)
    # Watch changes with HTTP: within a poll and its asks (1 s leaves room for a loaded machine;
    # the old 5 s refresh lagged up to 5 s)
    slack = 1.0
    assert abs(first_change(poller.watched, True, up - slack) - up) < slack, poller.watched
    assert abs(first_change(poller.watched, False, down - slack) - down) < slack, poller.watched
