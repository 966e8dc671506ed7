"""An idle scheduler keeps its executor: its keepalive pings stay within the executor's ping policy.

Issue 27: the servers set a ping-policy option gRPC does not know, so gRPC's 5-minute default
applied, and the scheduler's 20 s keepalive earned strikes until the executor sent GOAWAY
too_many_pings ("executor lost; requests will be recomputed"). Here the scheduler pings every
second against a 0.5 s policy window; with the policy ignored, GOAWAY comes at the third strike
(~3 s). A proxy between the two counts the HTTP/2 frames, so the test also sees that the pings
were sent (an idle pair that never pings would pass for the wrong reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagedserve.protos import grpc_options, scheduler_pb2, scheduler_pb2_grpc
from tests.services.conftest import (
    EXECUTOR_SERVICE,
    SCHEDULER_SERVICE,
    Service,
    executor_argv,
    scheduler_argv,
)

KEEPALIVE_MS = 1_000
POLICY_WINDOW_MS = 500  # the executor accepts a ping this long after the last one
# Past the strikes gRPC allows, with room: the old code lost its executor at about 3 s.
IDLE_S = (grpc_options.MAX_PING_STRIKES + 4) * KEEPALIVE_MS / 1000
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PING, GOAWAY, ACK = 6, 7, 1


class FrameCountingProxy:
    """Forwards unix-socket connections to `target`, counting HTTP/2 frames by direction."""

    def __init__(self, listen: str, target: str) -> None:
        self.target = target
        self.sent: Counter[str] = Counter()  # frames the client sent: "ping", "ping_ack", ...
        self.received: Counter[str] = Counter()  # frames the server sent
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(listen)
        self._sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                client, _ = self._sock.accept()
                server = socket.socket(socket.AF_UNIX)
                try:
                    server.connect(self.target)
                except OSError:  # not listening yet: the client retries
                    client.close()
                    continue
                for src, dst, count, skip in ((client, server, self.sent, len(PREFACE)),
                                              (server, client, self.received, 0)):
                    threading.Thread(target=self._pump, args=(src, dst, count, skip),
                                     daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, count: Counter[str], skip: int) -> None:
        buf = b""
        with contextlib.suppress(OSError), src, dst:
            while data := src.recv(65536):
                dst.sendall(data)
                buf += data
                if skip and len(buf) >= skip:
                    buf, skip = buf[skip:], 0
                while not skip and len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3]):
                    kind, flags = buf[3], buf[4]
                    name = {PING: "ping", GOAWAY: "goaway"}.get(kind, "other")
                    count[name + ("_ack" if kind == PING and flags & ACK else "")] += 1
                    buf = buf[9 + int.from_bytes(buf[:3]):]

    def close(self) -> None:
        self._sock.close()


@contextlib.contextmanager
def proxied_pair(model: Path, sock_dir: Path
                 ) -> Iterator[tuple[Service, Service, FrameCountingProxy]]:
    """executor <- proxy <- scheduler, stopped cleanly after."""
    executor_path = f"{sock_dir}/executor.sock"
    executor = Service("executor", executor_argv(model, f"unix://{executor_path}"), sock_dir)
    proxy = FrameCountingProxy(f"{sock_dir}/proxy.sock", executor_path)
    scheduler = None
    try:
        executor.wait_serving(f"unix://{executor_path}", EXECUTOR_SERVICE)
        scheduler = Service("scheduler", scheduler_argv(f"unix://{sock_dir}/proxy.sock",
                                                        f"unix://{sock_dir}/scheduler.sock"),
                            sock_dir)
        scheduler.wait_serving(f"unix://{sock_dir}/scheduler.sock", SCHEDULER_SERVICE)
        yield executor, scheduler, proxy
        assert scheduler.stop() == 0, scheduler.log()
        assert executor.stop() == 0, executor.log()
    finally:
        if scheduler is not None:
            scheduler.kill()
        executor.kill()
        proxy.close()


async def _generate(address: str, request_id: str) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.ScheduleRequest(request_id=request_id, prompt_token_ids=[11, 12],
                                                max_tokens=3, ignore_eos=True)
        return [t async for out in stub.Generate(request, timeout=30) for t in out.token_ids]


def test_idle_pair_keeps_its_execute_stream(llama_dir: Path, sock_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(grpc_options.KEEPALIVE_TIME_ENV, str(KEEPALIVE_MS))
    monkeypatch.setenv(grpc_options.MIN_PING_INTERVAL_ENV, str(POLICY_WINDOW_MS))
    address = f"unix://{sock_dir}/scheduler.sock"
    with proxied_pair(llama_dir, sock_dir) as (executor, scheduler, proxy):
        assert len(asyncio.run(_generate(address, "before"))) == 3  # opens the Execute stream
        pings_before = proxy.sent["ping"]
        time.sleep(IDLE_S)
        pings, goaways = proxy.sent["ping"] - pings_before, proxy.received["goaway"]
        assert len(asyncio.run(_generate(address, "after"))) == 3
        scheduler_log = scheduler.log_path.read_text(errors="replace")
        executor_log = executor.log_path.read_text(errors="replace")
    assert pings >= grpc_options.MAX_PING_STRIKES + 2, f"only {pings} keepalive pings while idle"
    assert goaways == 0, scheduler_log[-3000:]
    assert "executor lost" not in scheduler_log, scheduler_log[-3000:]
    assert executor_log.count("execute stream opened") == 1, executor_log[-3000:]
