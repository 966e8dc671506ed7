"""Run the router: uvicorn (HTTP) and the grpc.aio server (public gRPC) in one event loop.

    run_router(model_dir, "unix:///tmp/sched.sock", port=8000, grpc_port=50051)   # blocks

RouterServer is the same thing as an object to start and stop from async code; RouterThread runs
one in a background thread (tests and embedding), on ephemeral ports when asked for port 0.

SIGINT and SIGTERM are ours, not uvicorn's: uvicorn would re-raise the signal once it has shut
down, and the process would die of it (status 143) instead of exiting 0 after a clean drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import structlog
import uvicorn

from pagedserve.protos import tls
from pagedserve.router.app import create_app
from pagedserve.router.core import RouterCore
from pagedserve.router.grpc_service import HealthReporter, create_grpc_server

log = structlog.get_logger("pagedserve.router")


def _https() -> dict[str, str]:
    """uvicorn's TLS settings: HTTPS with the process's certificate (protos/tls.py), if any."""
    if not os.environ.get(tls.CERT_ENV):
        return {}
    return {"ssl_certfile": os.environ[tls.CERT_ENV], "ssl_keyfile": os.environ[tls.KEY_ENV]}


class _UvicornServer(uvicorn.Server):
    """uvicorn without its signal handling (serve_router stops it instead)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RouterServer:
    def __init__(self, core: RouterCore, host: str = "127.0.0.1", port: int = 8000,
                 grpc_port: int | None = None, enable_reflection: bool = False,
                 log_level: str = "info", health_interval_s: float = 5.0,
                 drain_timeout: float = 5.0) -> None:
        self.drain_timeout = drain_timeout
        self.core, self.host, self.port, self.grpc_port = core, host, port, grpc_port
        self.enable_reflection, self.log_level = enable_reflection, log_level
        self.health_interval_s = health_interval_s
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: HealthReporter | None = None

    async def start(self) -> None:
        """Bind and start serving; afterwards self.port and self.grpc_port are the real ports."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.core), log_level=self.log_level, lifespan="off",
                                ws="none", access_log=self.log_level == "debug", log_config=None,
                                timeout_graceful_shutdown=self.drain_timeout, **_https())
        self._http = _UvicornServer(config)
        self._http_task = asyncio.ensure_future(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        if self.grpc_port is not None:
            self._grpc, self.grpc_port, self._health = create_grpc_server(
                self.core, f"{self.host}:{self.grpc_port}", self.enable_reflection,
                self.health_interval_s)
            await self._grpc.start()
            self._health.start()
        log.info("router serving", model=self.core.model_name,
                 http=f"http://{self.host}:{self.port}",
                 grpc=f"{self.host}:{self.grpc_port}" if self._grpc else None,
                 api_key=bool(self.core.api_key))

    async def wait(self) -> None:
        """Until the HTTP server exits (a signal, or stop())."""
        assert self._http_task is not None, "start() first"
        await asyncio.shield(self._http_task)

    async def stop(self, grace_s: float | None = None) -> None:
        """Finish in-flight requests (up to grace_s, default drain_timeout), then close."""
        grace_s = self.drain_timeout if grace_s is None else grace_s
        if self._health is not None:
            await self._health.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._http_task
        await self.core.client.close()


async def serve_router(core: RouterCore, **kwargs) -> None:
    """Serve until SIGINT or SIGTERM (or the HTTP server exits), then drain and stop."""
    server = RouterServer(core, **kwargs)
    await server.start()
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, asyncio.ensure_future(server.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("signal received; draining", drain_timeout_s=server.drain_timeout)
    finally:
        waiter.cancel()
        await server.stop()
        for sig in handled:
            loop.remove_signal_handler(sig)
    log.info("router stopped")


def run_router(model_dir: str | Path, scheduler_addr: str, host: str = "127.0.0.1",
               port: int = 8000, grpc_port: int | None = None,
               served_model_name: str | None = None, *, enable_reflection: bool = False,
               log_level: str = "info", health_interval_s: float = 5.0,
               drain_timeout: float = 5.0, core_options: dict[str, Any] | None = None) -> None:
    """Serve the OpenAI HTTP API on host:port and, when grpc_port is given, the public gRPC API
    on host:grpc_port, both in one uvloop event loop, until SIGINT or SIGTERM (then drain and
    return).

    scheduler_addr: 'unix:///path/to.sock' or 'host:port' of the internal Scheduler service.
    drain_timeout: on shutdown, how long in-flight requests may run on before they are cut.
    core_options: RouterCore's keyword options (limits, api_key, trust_request_chat_template).
    """
    core = RouterCore(model_dir, scheduler_addr, served_model_name, **(core_options or {}))
    coro = serve_router(core, host=host, port=port, grpc_port=grpc_port,
                        enable_reflection=enable_reflection, log_level=log_level,
                        health_interval_s=health_interval_s, drain_timeout=drain_timeout)
    try:
        import uvloop
    except ImportError:  # Windows
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


class RouterThread:
    """A router in a background thread with its own event loop; ports 0 pick free ones.

        with RouterThread(model_dir, "unix:///tmp/s.sock", grpc_port=0) as r:
            OpenAI(base_url=r.base_url + "/v1", api_key="x")...
    """

    def __init__(self, model_dir: str | Path, scheduler_addr: str,
                 served_model_name: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 grpc_port: int | None = None, core_options: dict[str, Any] | None = None,
                 **kwargs) -> None:
        self.core = RouterCore(model_dir, scheduler_addr, served_model_name,
                               **(core_options or {}))
        self.server = RouterServer(self.core, host=host, port=port, grpc_port=grpc_port,
                                   log_level=kwargs.pop("log_level", "warning"), **kwargs)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.server.host}:{self.server.grpc_port}"

    def start(self, timeout: float = 30.0) -> RouterThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("router did not start")
        if self._error is not None:
            raise RuntimeError("router failed to start") from self._error
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.stop(grace_s=1.0)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> RouterThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
