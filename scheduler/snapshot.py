"""A picture of the page table and the queues at one moment, for the router's /dashboard.

Per block: its state (free, free but still holding cached KV, held by one request, shared by
several), its reference count and one holder; per request: where it is and how far it has got. It
is built on demand, on the scheduler's event loop between steps, in one pass over the blocks and
one over the requests' block tables (about 10 ms for 100,000 blocks), so a dashboard polling a few
times a second costs the step loop little.
"""

from __future__ import annotations

from pagedserve.protos import scheduler_pb2
from pagedserve.scheduler.request import Request, RequestStatus
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.step_history import StepHistory

FREE, CACHED, HELD, SHARED = 0, 1, 2, 3
NO_OWNER, UNLISTED_OWNER = 0, 255
DEFAULT_MAX_REQUESTS = 200
MAX_LISTED_OWNERS = 254  # owner bytes 1..254 name listed requests


def _entry(req: Request, state: str) -> scheduler_pb2.RequestEntry:
    return scheduler_pb2.RequestEntry(
        request_id=req.request_id, state=state, prompt_tokens=req.num_prompt_tokens,
        output_tokens=req.num_output_tokens, max_tokens=req.stop.max_tokens,
        computed_tokens=req.num_computed_tokens, num_blocks=len(req.block_ids),
        cached_tokens=req.num_cached_tokens)


def _block_bytes(scheduler: Scheduler, listed: list[Request]) -> tuple[bytes, bytes, bytes]:
    blocks = scheduler.kv.pool.blocks
    states = bytearray(len(blocks))
    refs = bytearray(len(blocks))
    for block in blocks:
        ref = block.ref_count
        refs[block.block_id] = min(ref, 255)
        states[block.block_id] = (SHARED if ref > 1 else HELD if ref == 1
                                  else CACHED if block.block_hash is not None else FREE)
    owners = bytearray(len(blocks))
    index = {id(req): i + 1 for i, req in enumerate(listed[:MAX_LISTED_OWNERS])}
    for req in scheduler.running:
        mark = index.get(id(req), UNLISTED_OWNER)
        for block_id in req.block_ids:
            if owners[block_id] == NO_OWNER:
                owners[block_id] = mark
    return bytes(states), bytes(owners), bytes(refs)


def snapshot(scheduler: Scheduler, history: StepHistory,
             max_requests: int = 0) -> scheduler_pb2.SnapshotResponse:
    """The SnapshotResponse of this moment (protos/scheduler.proto says what each field means)."""
    limit = max_requests if max_requests > 0 else DEFAULT_MAX_REQUESTS
    listed: list[Request] = list(scheduler.running[:limit])
    waiting = list(scheduler.waiting)
    listed += waiting[:max(0, limit - len(listed))]
    states, owners, refs = _block_bytes(scheduler, listed)
    kv = scheduler.kv.stats()
    resp = scheduler_pb2.SnapshotResponse(
        block_size=scheduler.config.block_size, block_states=states, block_owners=owners,
        block_ref_counts=refs, num_running=len(scheduler.running), num_waiting=len(waiting),
        num_preempted=sum(r.status == RequestStatus.PREEMPTED for r in waiting),
        max_num_batched_tokens=scheduler.config.max_num_batched_tokens,
        max_num_seqs=scheduler.config.max_num_seqs, recent_steps=list(history.samples),
        prefix_cache_queries=kv.prefix_cache_query_tokens,
        prefix_cache_hits=kv.prefix_cache_hit_tokens, num_preemptions=scheduler.num_preemptions)
    running = set(map(id, scheduler.running))
    resp.requests.extend(
        _entry(r, "running" if id(r) in running
               else "preempted" if r.status == RequestStatus.PREEMPTED else "waiting")
        for r in listed)
    return resp
