"""The router's client for the internal Scheduler service (grpc.aio).

The channel is opened on first use, inside the running event loop, so one client can be built
before the server's loop starts. Requests go over one Session stream (router/scheduler_session.py),
opened on first use and again after it broke; closing a request's iterator early cancels it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from pagedserve.protos import executor_pb2, grpc_options, scheduler_pb2, scheduler_pb2_grpc, tls
from pagedserve.router.scheduler_session import SchedulerSession


class SchedulerClient:
    def __init__(self, address: str) -> None:
        """address: 'unix:///path/to.sock' or 'host:port'."""
        self.address = address
        self._channel: grpc.aio.Channel | None = None
        self._stub: scheduler_pb2_grpc.SchedulerStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: SchedulerSession | None = None

    @property
    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            self._channel = tls.aio_channel(self.address,
                                            list(grpc_options.SCHEDULER_CHANNEL.items()))
            self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
            self._loop = loop
            self._session = None
        return self._stub

    def generate(self, request: scheduler_pb2.ScheduleRequest
                 ) -> AsyncIterator[scheduler_pb2.TokenOutput]:
        """Stream the request's token outputs; closing the iterator early cancels the request."""
        stub = self.stub
        if self._session is None or self._session.failed is not None:
            self._session = SchedulerSession(stub)
        return self._session.generate(request)

    async def abort(self, request_id: str, timeout: float = 5.0) -> bool:
        reply = await self.stub.Abort(scheduler_pb2.AbortRequest(request_id=request_id),
                                      timeout=timeout)
        return reply.found

    async def stats(self, timeout: float = 2.0) -> scheduler_pb2.StatsResponse:
        return await self.stub.Stats(scheduler_pb2.StatsRequest(), timeout=timeout)

    async def snapshot(self, max_requests: int = 0, timeout: float = 2.0
                       ) -> scheduler_pb2.SnapshotResponse:
        return await self.stub.Snapshot(scheduler_pb2.SnapshotRequest(max_requests=max_requests),
                                        timeout=timeout)

    async def model_info(self, timeout: float = 5.0, wait_for_ready: bool = False
                         ) -> executor_pb2.DescribeResponse:
        return await self.stub.ModelInfo(scheduler_pb2.ModelInfoRequest(), timeout=timeout,
                                         wait_for_ready=wait_for_ready)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = self._loop = self._session = None
