"""/dashboard: the page table and the queues of a running server, live in a browser.

The page and its script are static files (router/static/, no CDN) served to anyone: they hold no
data. The data comes from /dashboard/state, which the page polls a few times a second and which
follows /metrics' API-key rule (the key, or none with --metrics-public). A poll asks the
scheduler for a Snapshot (scheduler/snapshot.py); snapshots are reused for MIN_INTERVAL_S, so any
number of open dashboards costs the scheduler at most a few snapshots a second. Per-block bytes go
out base64-encoded (a byte per block: 100,000 blocks are ~130 KB per field), and the page
aggregates blocks into cells when they outnumber its pixels.
"""

from __future__ import annotations

import base64
import time
from importlib import resources

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pagedserve.protos import scheduler_pb2
from pagedserve.router.core import RouterCore
from pagedserve.router.errors import from_grpc, invalid_request
from pagedserve.router.http_middleware import DASHBOARD_STATE, DASHBOARD_STATIC
from pagedserve.router.replicas import SchedulerReplicas

STATIC_FILES = {"/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
                "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8")}
assert set(STATIC_FILES) == DASHBOARD_STATIC  # the API-key middleware leaves exactly these open
MIN_INTERVAL_S = 0.25


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def state_json(snap: scheduler_pb2.SnapshotResponse, replica: int, replicas: int) -> dict:
    """The page's view of one snapshot (field meanings: protos/scheduler.proto)."""
    queries, hits = snap.prefix_cache_queries, snap.prefix_cache_hits
    return {
        "replica": replica, "replicas": replicas, "block_size": snap.block_size,
        "num_blocks": len(snap.block_states), "block_states": _b64(snap.block_states),
        "block_owners": _b64(snap.block_owners), "block_ref_counts": _b64(snap.block_ref_counts),
        "requests": [{"id": r.request_id, "state": r.state, "prompt_tokens": r.prompt_tokens,
                      "output_tokens": r.output_tokens, "max_tokens": r.max_tokens,
                      "computed_tokens": r.computed_tokens, "num_blocks": r.num_blocks,
                      "cached_tokens": r.cached_tokens} for r in snap.requests],
        "num_running": snap.num_running, "num_waiting": snap.num_waiting,
        "num_preempted": snap.num_preempted, "num_preemptions": snap.num_preemptions,
        "token_budget": snap.max_num_batched_tokens, "max_num_seqs": snap.max_num_seqs,
        "steps": [{"end": s.end_time, "seconds": s.seconds, "prefill": s.prefill_tokens,
                   "decode": s.decode_tokens, "outputs": s.output_tokens,
                   "requests": s.num_requests} for s in snap.recent_steps],
        "prefix_cache": {"queries": queries, "hits": hits,
                         "hit_rate": hits / queries if queries else 0.0},
    }


class SnapshotCache:
    """The latest snapshot per replica and when it was taken."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core
        self.taken: dict[int, tuple[float, scheduler_pb2.SnapshotResponse]] = {}

    def num_replicas(self) -> int:
        client = self.core.client
        return len(client.replicas) if isinstance(client, SchedulerReplicas) else 1

    async def get(self, replica: int) -> scheduler_pb2.SnapshotResponse:
        now = time.monotonic()
        hit = self.taken.get(replica)
        if hit is not None and now - hit[0] < MIN_INTERVAL_S:
            return hit[1]
        client = self.core.client
        snap = (await client.snapshot(replica=replica) if isinstance(client, SchedulerReplicas)
                else await client.snapshot())
        self.taken[replica] = (now, snap)
        return snap


def _replica_param(request: Request, replicas: int) -> int:
    raw = request.query_params.get("replica", "0")
    if not raw.isdigit() or int(raw) >= replicas:
        raise invalid_request(f"replica must be an integer in [0, {replicas}), got {raw!r}",
                              "replica")
    return int(raw)


def add_dashboard_routes(app: FastAPI, core: RouterCore) -> None:
    cache = SnapshotCache(core)
    static = resources.files("pagedserve.router") / "static"

    for path, (name, media_type) in STATIC_FILES.items():
        body = (static / name).read_bytes()

        async def serve_static(body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers={"cache-control": "no-cache"})

        app.add_api_route(path, serve_static, methods=["GET"], include_in_schema=False)

    @app.get(DASHBOARD_STATE, include_in_schema=False)
    async def dashboard_state(request: Request) -> JSONResponse:
        replicas = cache.num_replicas()
        replica = _replica_param(request, replicas)
        try:
            snap = await cache.get(replica)
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e) from None
        return JSONResponse(state_json(snap, replica, replicas))
