"""Server interceptors that answer INVALID_ARGUMENT to a request body that does not parse.

gRPC Python answers such a body UNKNOWN (grpc.aio) or INTERNAL (grpc.server) and logs a
multi-line traceback for each call, which breaks the JSON-lines log and lets junk traffic flood
it. Here the method's own parser runs inside a wrapper: a body that fails reaches the handler as a
`BadBody`, and the call ends INVALID_ARGUMENT before any servicer code sees it; the log gets one
JSON line per second at most, counting the refusals it left out. `AioParseGuard` is for grpc.aio
servers (router, scheduler), `ParseGuard` for grpc.server (executor). It sits in protos because
the three parts serve these contracts and share no other module.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import structlog

log = structlog.get_logger("pagedserve.grpc")
Behavior = Callable[..., Any]


class BadBody:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("error", "size")

    def __init__(self, size: int, error: str) -> None:
        self.size, self.error = size, error

    @property
    def message(self) -> str:
        return f"the request body is not a valid protobuf message for this method: {self.error}"


class RefusalLog:
    """At most one log line per `interval_s`; each line counts the refusals left out before it."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()  # grpc.server calls from its pool threads

    def refused(self, method: str, body: BadBody) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._suppressed += 1
                return
            self._next, suppressed, self._suppressed = now + self.interval_s, self._suppressed, 0
        log.warning("invalid request body; answered INVALID_ARGUMENT", method=method,
                    body_bytes=body.size, error=body.error, suppressed=suppressed)


REFUSALS = RefusalLog()


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if parse is None:
            return data
        try:
            return parse(data)
        except Exception as e:  # whatever the parser raises, it is about the client's bytes
            return BadBody(len(data), str(e) or type(e).__name__)
    return deserialize


# (attribute of grpc.RpcMethodHandler, takes a request stream, how to build one)
_KINDS = (("unary_unary", False, grpc.unary_unary_rpc_method_handler),
          ("unary_stream", False, grpc.unary_stream_rpc_method_handler),
          ("stream_unary", True, grpc.stream_unary_rpc_method_handler),
          ("stream_stream", True, grpc.stream_stream_rpc_method_handler))


def _guarded(handler: grpc.RpcMethodHandler, method: str,
             behavior: Callable[[Behavior, bool, str], Behavior]) -> grpc.RpcMethodHandler:
    """`handler` with a parser that cannot fail and the behaviour `behavior` wraps around it."""
    for name, streaming_request, make in _KINDS:
        inner = getattr(handler, name)
        if inner is not None:
            return make(behavior(inner, streaming_request, method),
                        request_deserializer=_tolerant(handler.request_deserializer),
                        response_serializer=handler.response_serializer)
    return handler


# --- grpc.server (threads) ------------------------------------------------------------------------

def _check(request: Any, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(request, BadBody):
        REFUSALS.refused(method, request)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)  # raises


def _checked(requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
    for request in requests:
        _check(request, context, method)
        yield request


def _sync_behavior(inner: Behavior, streaming_request: bool, method: str) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if streaming_request:
            return inner(_checked(request, context, method), context)
        _check(request, context, method)
        return inner(request, context)
    return call


class ParseGuard(grpc.ServerInterceptor):
    """For grpc.server: INVALID_ARGUMENT for a request body that does not parse."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                       grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        return None if handler is None else _guarded(handler, details.method, _sync_behavior)


# --- grpc.aio -------------------------------------------------------------------------------------

async def _check_aio(request: Any, context: grpc.aio.ServicerContext, method: str) -> Any:
    if isinstance(request, BadBody):
        REFUSALS.refused(method, request)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)  # raises
    return request


async def _checked_aio(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                       method: str) -> AsyncIterator[Any]:
    async for request in requests:
        yield await _check_aio(request, context, method)


def _aio_behavior(inner: Behavior, streaming_request: bool, method: str) -> Behavior:
    async def prepare(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if streaming_request:
            return _checked_aio(request, context, method)
        return await _check_aio(request, context, method)

    if inspect.isasyncgenfunction(inner):  # a method that yields its responses
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            responses = inner(await prepare(request, context), context)
            async with contextlib.aclosing(responses):  # its finally runs now, not at GC
                async for response in responses:
                    yield response
        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await inner(await prepare(request, context), context)
    return call


class AioParseGuard(grpc.aio.ServerInterceptor):
    """For grpc.aio servers: INVALID_ARGUMENT for a request body that does not parse."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        return None if handler is None else _guarded(handler, details.method, _aio_behavior)
