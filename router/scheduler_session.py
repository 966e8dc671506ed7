"""The router's end of a Scheduler Session: every request of this process on one gRPC stream.

`generate` looks like a Generate call (outputs of one request; closing early cancels it; a
failure raises grpc.aio.AioRpcError with the status Generate would have ended with), but the
scheduler sends each step's outputs for all of them as one message: one wake-up per step for
the router's event loop instead of one per request per step. When the stream breaks (the
scheduler restarted), its open requests fail with its status, and the client opens a new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from pagedserve.protos import scheduler_pb2, scheduler_pb2_grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def session_broken(e: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """The error the session's open requests fail with when its stream breaks: UNAVAILABLE (the
    scheduler is gone, so they may be resumed elsewhere) whatever the transport reported. The
    scheduler never ends a session with a status of its own (a request's error travels in its
    TokenOutput), and a process killed while writing a message leaves gRPC's core reporting
    INTERNAL ("Internal error from Core") instead of UNAVAILABLE; measured under load, 3 kills in
    10 did. Only our own cancel keeps its code."""
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return e
    return rpc_error(grpc.StatusCode.UNAVAILABLE,
                     f"the session with the scheduler broke ({e.code().name}: {e.details()})")


class SchedulerSession:
    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        self._outbox: asyncio.Queue[scheduler_pb2.SessionRequest | None] = asyncio.Queue()
        self._inboxes: dict[str, asyncio.Queue[scheduler_pb2.TokenOutput | Exception]] = {}
        self.failed: grpc.aio.AioRpcError | None = None
        self._call = stub.Session(self._requests())
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[scheduler_pb2.SessionRequest]:
        while (msg := await self._outbox.get()) is not None:
            yield msg

    async def _read(self) -> None:
        try:
            async for batch in self._call:
                for out in batch.outputs:
                    inbox = self._inboxes.get(out.request_id)
                    if inbox is not None:
                        inbox.put_nowait(out)
            error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the scheduler ended the session")
        except grpc.aio.AioRpcError as e:
            error = session_broken(e)
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.CANCELLED, "the router closed the session")
        self.failed = error
        for inbox in self._inboxes.values():
            inbox.put_nowait(error)

    async def generate(self, request: scheduler_pb2.ScheduleRequest
                       ) -> AsyncIterator[scheduler_pb2.TokenOutput]:
        """The request's outputs, its finished one last; closing early cancels it."""
        rid = request.request_id
        if self.failed is not None:
            raise self.failed
        if rid in self._inboxes:
            raise rpc_error(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already running")
        inbox: asyncio.Queue[scheduler_pb2.TokenOutput | Exception] = asyncio.Queue()
        self._inboxes[rid] = inbox
        self._outbox.put_nowait(scheduler_pb2.SessionRequest(schedule=request))
        done = False
        try:
            while not done:
                out = await inbox.get()
                if isinstance(out, Exception):
                    done = True
                    raise out
                if out.error_code:
                    done = True
                    raise rpc_error(_CODES.get(out.error_code, grpc.StatusCode.UNKNOWN),
                                    out.error_message)
                done = out.finished
                yield out
        finally:
            del self._inboxes[rid]
            if not done and self.failed is None:
                self._outbox.put_nowait(scheduler_pb2.SessionRequest(
                    cancel=scheduler_pb2.AbortRequest(request_id=rid)))

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
