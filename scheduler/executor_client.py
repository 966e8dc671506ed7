"""Clients for an executor behind gRPC.

`GrpcExecutorClient` is the blocking `ExecutorClient` (describe / execute), for callers that drive
`Scheduler.step()` themselves. `AsyncExecutorConnection` is what the scheduler server's step loop
uses: the same two calls on grpc.aio, one long-lived Execute stream with one plan in flight.

Both raise `ExecutorGone` when the executor cannot be reached or its stream broke; the caller then
treats every executor-side state as lost (see `Scheduler.reset_executor_state`).
"""

from __future__ import annotations

import asyncio
import os
import queue
from collections.abc import Iterator

import grpc

from pagedserve.protos import executor_pb2, executor_pb2_grpc, grpc_options, tls
from pagedserve.protos.request_checks import REFUSED_REQUEST_KEY


def channel_options() -> list[tuple[str, int]]:
    """grpc_options.EXECUTOR_CHANNEL (quick reconnects, keepalive pings), its ping interval
    overridable from the environment (tests)."""
    ms = int(os.environ.get(grpc_options.KEEPALIVE_TIME_ENV, grpc_options.KEEPALIVE_TIME_MS))
    return list({**grpc_options.EXECUTOR_CHANNEL, grpc_options.KEEPALIVE_TIME: ms}.items())


class ExecutorGone(Exception):
    """The executor is unreachable, or its Execute stream ended or failed; refused_request_id:
    the request it ended the stream over (protos/request_checks.py), if it named one."""

    def __init__(self, message: str, refused_request_id: str | None = None) -> None:
        super().__init__(message)
        self.refused_request_id = refused_request_id


def _refused(e: Exception) -> str | None:
    """The request an executor's refusal names in its trailing metadata."""
    metadata = e.trailing_metadata() if isinstance(e, grpc.aio.AioRpcError | grpc.Call) else None
    value = dict(metadata or ()).get(REFUSED_REQUEST_KEY)
    return value.decode(errors="replace") if isinstance(value, bytes) else None


def _check_step(plan: executor_pb2.StepPlan, result: executor_pb2.StepResult) -> None:
    if result.step_id != plan.step_id:
        raise ExecutorGone(f"executor answered step {result.step_id} to plan {plan.step_id}")


class GrpcExecutorClient:
    """A blocking `ExecutorClient` over one gRPC channel (unix:///path or host:port)."""

    def __init__(self, address: str, *, describe_timeout: float = 30.0) -> None:
        self.address = address
        self._describe_timeout = describe_timeout
        self._channel = tls.channel(address, channel_options())
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._plans: queue.SimpleQueue[executor_pb2.StepPlan | None] | None = None
        self._results: Iterator[executor_pb2.StepResult] | None = None

    def describe(self) -> executor_pb2.DescribeResponse:
        try:
            return self._stub.Describe(executor_pb2.DescribeRequest(),
                                       timeout=self._describe_timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise ExecutorGone(f"Describe failed: {e.code().name}: {e.details()}") from e

    def execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        if self._results is None:
            plans: queue.SimpleQueue[executor_pb2.StepPlan | None] = queue.SimpleQueue()
            self._plans = plans
            self._results = self._stub.Execute(iter(plans.get, None))
        assert self._plans is not None
        self._plans.put(plan)
        try:
            result = next(self._results)
        except (grpc.RpcError, StopIteration) as e:
            self._drop_stream()
            raise ExecutorGone(f"Execute stream broke: {e}", _refused(e)) from e
        _check_step(plan, result)
        return result

    def _drop_stream(self) -> None:
        if self._plans is not None:
            self._plans.put(None)
        if isinstance(self._results, grpc.Call):
            self._results.cancel()
        self._plans = self._results = None

    def close(self) -> None:
        self._drop_stream()
        self._channel.close()


class AsyncExecutorConnection:
    """The grpc.aio twin of `GrpcExecutorClient`; the channel reconnects by itself."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = tls.aio_channel(address, channel_options())
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._call: grpc.aio.StreamStreamCall | None = None

    async def describe(self, timeout: float) -> executor_pb2.DescribeResponse:
        try:
            return await self._stub.Describe(executor_pb2.DescribeRequest(), timeout=timeout,
                                             wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise ExecutorGone(f"Describe failed: {e.code().name}: {e.details()}") from e

    async def execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        """Sends one plan on the (lazily opened) Execute stream and awaits its result."""
        await self.send(plan)
        return await self.receive(plan)

    async def send(self, plan: executor_pb2.StepPlan) -> None:
        """Queues a plan on the Execute stream (the executor runs plans in the order sent, so
        a plan sent before the previous result came back starts as soon as that step ends)."""
        if self._call is None:
            self._call = self._stub.Execute()
        try:
            await self._call.write(plan)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            self.drop_stream()
            raise ExecutorGone(f"Execute stream broke: {e}", _refused(e)) from e

    async def receive(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        """The result of `plan`, the oldest plan sent and not answered yet."""
        if self._call is None:
            raise ExecutorGone("no Execute stream")
        try:
            result = await self._call.read()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            self.drop_stream()
            raise ExecutorGone(f"Execute stream broke: {e}", _refused(e)) from e
        if result is grpc.aio.EOF:
            self.drop_stream()
            raise ExecutorGone("Execute stream ended")
        _check_step(plan, result)
        return result

    async def wait_until_not_ready(self) -> None:
        """Returns once the channel is not READY (the executor went away, or was never there)."""
        state = self._channel.get_state(try_to_connect=False)
        while state == grpc.ChannelConnectivity.READY:
            await self._channel.wait_for_state_change(state)
            state = self._channel.get_state(try_to_connect=False)

    def drop_stream(self) -> None:
        """Forgets the current Execute stream; the next `execute` opens a fresh one."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def close(self) -> None:
        self.drop_stream()
        await self._channel.close()
