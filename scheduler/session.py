"""The Session stream: many requests on one gRPC stream, their outputs batched per step.

A router with a hundred requests in flight would otherwise receive a hundred messages per step,
each a wake-up of gRPC's poller and of its event loop on both ends; here the step loop's deltas
for all of a session's requests land in one list (`SessionOutputs`, the step loop's sink for
them) and leave as one TokenOutputBatch. Cancelling one request is a message on the stream;
when the stream goes away, every request still running on it is aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from pagedserve.protos import scheduler_pb2
from pagedserve.scheduler.admission import admit
from pagedserve.scheduler.outputs import RequestOutputDelta
from pagedserve.scheduler.step_loop import StepLoop
from pagedserve.scheduler.token_output import append_delta, error_output


class SessionOutputs:
    """What waits to go out on one session: step-loop deltas and failed admissions."""

    def __init__(self) -> None:
        self._items: list[RequestOutputDelta | scheduler_pb2.TokenOutput] = []
        self._ready = asyncio.Event()

    def put_nowait(self, item: RequestOutputDelta | scheduler_pb2.TokenOutput) -> None:
        self._items.append(item)
        self._ready.set()

    def wake(self) -> None:
        self._ready.set()

    async def take(self) -> list[RequestOutputDelta | scheduler_pb2.TokenOutput]:
        await self._ready.wait()
        self._ready.clear()
        items, self._items = self._items, []
        return items


def build_batch(items: list[RequestOutputDelta | scheduler_pb2.TokenOutput],
                live: set[str]) -> scheduler_pb2.TokenOutputBatch:
    """One TokenOutput per request in `items`; finished requests leave `live`, and deltas of
    requests no longer live (cancelled meanwhile) are dropped."""
    batch = scheduler_pb2.TokenOutputBatch()
    merged: dict[str, scheduler_pb2.TokenOutput] = {}
    for item in items:
        if isinstance(item, scheduler_pb2.TokenOutput):  # an admission error
            batch.outputs.append(item)
            continue
        rid = item.request_id
        if rid not in live:
            continue
        out = merged.get(rid)
        if out is None:
            out = merged[rid] = batch.outputs.add(request_id=rid)
        append_delta(out, item)
        if item.finished:
            live.discard(rid)
    return batch


async def _read_requests(loop: StepLoop, requests: AsyncIterator[scheduler_pb2.SessionRequest],
                         outputs: SessionOutputs, live: set[str],
                         accepting: Callable[[], bool]) -> None:
    try:
        async for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == "schedule":
                rid = msg.schedule.request_id
                error = await admit(loop, msg.schedule, outputs, accepting=accepting(),
                                    timeout=None)
                if error is None:
                    live.add(rid)
                else:
                    outputs.put_nowait(error_output(rid, *error))
            elif kind == "cancel" and msg.cancel.request_id in live:
                live.discard(msg.cancel.request_id)
                loop.abort(msg.cancel.request_id, notify=False)
    finally:
        outputs.wake()  # the writer ends once the caller is done and nothing is live


def _failed(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def run_session(loop: StepLoop, requests: AsyncIterator[scheduler_pb2.SessionRequest],
                      accepting: Callable[[], bool]) -> AsyncIterator[scheduler_pb2.TokenOutputBatch]:
    """The batches of one Session call, until the caller has closed its side and every request
    has finished; requests still live when it stops early are aborted."""
    outputs, live = SessionOutputs(), set()
    reader = asyncio.create_task(_read_requests(loop, requests, outputs, live, accepting))
    try:
        while True:
            batch = build_batch(await outputs.take(), live)
            if batch.outputs:
                yield batch
            # the reader wakes the writer as it ends, so this take saw everything it put
            if reader.done() and (not live or _failed(reader)):
                break
        if _failed(reader):
            raise reader.exception()
    finally:
        reader.cancel()
        for rid in live:
            loop.abort(rid, notify=False)
