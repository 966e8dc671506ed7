"""Data parallelism behind one router: several schedulers (each with its executors), and which one
serves each request.

A router given several scheduler addresses (`--scheduler a,b,...`) sends each request to one
replica, chosen by prefix affinity: the prompt's leading tokens (whole blocks of them, up to
AFFINITY_TOKENS) are hashed with each live replica's address and the highest score wins
(rendezvous hashing: a replica that goes or comes moves only its own share of prefixes). So
requests that share a long prefix (a system prompt, a document, n > 1 choices) land where its KV
is already cached. Affinity yields to load: when the chosen replica has more than load_slack
requests in flight beyond the least loaded one, the least loaded takes the request instead. A
prompt with no whole block has no prefix to share and goes to the least loaded.

A replica that cannot be reached (UNAVAILABLE before it sent anything) is taken out for a back-off
that doubles with each failure (from BACKOFF_S to BACKOFF_MAX_S) and the request is tried on
another; one that already streamed tokens fails with its stream, as with a single scheduler.
The set answers the calls RouterCore makes of a SchedulerClient.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from pagedserve.protos import executor_pb2, scheduler_pb2
from pagedserve.router import replica_dns
from pagedserve.router.metrics import Metric, labelled
from pagedserve.router.replica_dns import DnsRefresh
from pagedserve.router.scheduler_client import SchedulerClient

AFFINITY_BLOCK = 16  # tokens hashed together (a typical KV block)
AFFINITY_TOKENS = 512  # the most leading tokens that decide the replica
BACKOFF_S, BACKOFF_MAX_S = 1.0, 30.0
POLICIES = ("prefix", "round_robin")


@dataclass
class Replica:
    address: str
    client: SchedulerClient
    in_flight: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0
    routed: int = 0  # requests sent here

    def usable(self, now: float) -> bool:
        return now >= self.down_until

    def failed(self, now: float) -> None:
        self.failures += 1
        self.down_until = now + min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (self.failures - 1))


@dataclass
class AffinityCounts:
    keyed: int = 0  # requests with a prefix to route by
    kept: int = 0  # of those, sent to their affinity replica (not moved by load or failure)
    retried: int = 0  # requests moved off a replica that could not be reached


def affinity_key(prompt_ids: Sequence[int]) -> bytes | None:
    """The digest of the prompt's leading whole blocks (never its last token, which differs
    between otherwise equal prompts less often than it ends them); None when there are none."""
    usable = min(len(prompt_ids) - 1, AFFINITY_TOKENS) // AFFINITY_BLOCK * AFFINITY_BLOCK
    if usable <= 0:
        return None
    head = np.asarray(prompt_ids[:usable], dtype=np.int32).tobytes()
    return hashlib.blake2b(head, digest_size=16).digest()


def pick(replicas: Sequence[Replica], key: bytes | None, load_slack: int,
         now: float) -> tuple[Replica | None, bool]:
    """The replica for a request and whether it is the key's affinity replica; (None, False)
    when none is usable."""
    live = [r for r in replicas if r.usable(now)]
    if not live:
        return None, False
    least = min(live, key=lambda r: r.in_flight)
    if key is None:
        return least, False
    best = max(live, key=lambda r: hashlib.blake2b(key + r.address.encode(),
                                                   digest_size=8).digest())
    if best.in_flight > least.in_flight + load_slack:
        return least, False
    return best, True


class SchedulerReplicas:
    """Several SchedulerClients behind the calls RouterCore makes of one."""

    def __init__(self, addresses: Sequence[str], load_slack: int = 8,
                 policy: str = "prefix") -> None:
        """policy: "prefix" (affinity, as above) or "round_robin" (for comparison)."""
        if len(set(addresses)) != len(addresses) or not addresses:
            raise ValueError(f"scheduler: addresses must be distinct and present, got {addresses}")
        if policy not in POLICIES:
            raise ValueError(f"replica policy: {policy!r} is not one of {POLICIES}")
        self.policy = policy
        self._turn = 0
        self.replicas = [Replica(a, SchedulerClient(a)) for a in addresses]
        self.load_slack = load_slack
        self.counts = AffinityCounts()
        self.address = ",".join(addresses)
        self.refresh: DnsRefresh | None = None  # set when the set is a DNS name's

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """The replicas are now these: those kept keep their state (load, back-off); streams
        on a dropped one go on to their end."""
        known = {r.address: r for r in self.replicas}
        self.replicas = [known.get(a) or Replica(a, SchedulerClient(a)) for a in addresses]

    async def generate(self, request: scheduler_pb2.ScheduleRequest
                       ) -> AsyncIterator[scheduler_pb2.TokenOutput]:
        if self.refresh is not None and (found := await self.refresh.addresses()):
            self.set_addresses(found)
        key = affinity_key(request.prompt_token_ids) if self.policy == "prefix" else None
        self.counts.keyed += key is not None
        tried: list[Replica] = []
        while True:
            candidates = [r for r in self.replicas if r not in tried]
            replica, kept = self._pick(candidates, key)
            if replica is None:
                raise _unavailable(tried)
            self.counts.kept += kept and not tried
            replica.in_flight += 1
            replica.routed += 1
            started = False
            try:
                async with contextlib.aclosing(replica.client.generate(request)) as stream:
                    async for out in stream:
                        started = True
                        replica.failures = 0
                        yield out
                return
            except grpc.aio.AioRpcError as e:
                if started or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                replica.failed(time.monotonic())
                tried.append(replica)
                self.counts.retried += 1
            finally:
                replica.in_flight -= 1

    def _pick(self, candidates: list[Replica], key: bytes | None) -> tuple[Replica | None, bool]:
        now = time.monotonic()
        if self.policy == "round_robin":
            live = [r for r in candidates if r.usable(now)]
            self._turn += 1
            return (live[self._turn % len(live)] if live else None), False
        return pick(candidates, key, self.load_slack, now)

    async def abort(self, request_id: str, timeout: float = 5.0) -> bool:
        found = False
        for replica in self.replicas:
            try:
                found = await replica.client.abort(request_id, timeout) or found
            except grpc.aio.AioRpcError:
                continue
        return found

    async def stats(self, timeout: float = 2.0) -> scheduler_pb2.StatsResponse:
        """The replicas' stats summed (rates recomputed); executor_connected when any replica
        can serve. Raises the last error when none answers."""
        total, error = scheduler_pb2.StatsResponse(), None
        for replica in self.replicas:
            try:
                _add_stats(total, await replica.client.stats(timeout))
            except grpc.aio.AioRpcError as e:
                error = e
        if error is not None and not total.blocks_total and not total.executor_connected:
            raise error
        queries = total.prefix_cache_queries
        total.prefix_cache_hit_rate = total.prefix_cache_hits / queries if queries else 0.0
        return total

    async def snapshot(self, max_requests: int = 0, timeout: float = 2.0, replica: int = 0
                       ) -> scheduler_pb2.SnapshotResponse:
        """One replica's page table and queues (each replica has its own pool)."""
        if not 0 <= replica < len(self.replicas):
            raise ValueError(f"replica: {replica} is not in [0, {len(self.replicas)})")
        return await self.replicas[replica].client.snapshot(max_requests, timeout)

    async def model_info(self, timeout: float = 5.0, wait_for_ready: bool = False
                         ) -> executor_pb2.DescribeResponse:
        """The first answering replica's (replicas serve one model)."""
        error: grpc.aio.AioRpcError | None = None
        for replica in self.replicas:
            try:
                return await replica.client.model_info(timeout, wait_for_ready)
            except grpc.aio.AioRpcError as e:
                error = e
        assert error is not None
        raise error

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.client.close()

    def metric_families(self) -> list[Metric]:
        """Per-replica load and routing, and the affinity counts, for /metrics."""
        families = [labelled(name, help_, {r.address: value_of(r) for r in self.replicas})
                    for name, help_, value_of in (
                        ("replica_requests_in_flight",
                         "Requests in flight on each scheduler replica.", lambda r: r.in_flight),
                        ("replica_requests_total", "Requests sent to each scheduler replica.",
                         lambda r: r.routed),
                        ("replica_up", "1 unless the replica is in its back-off after failing.",
                         lambda r: r.usable(time.monotonic())))]
        c = self.counts
        return [*families,
                labelled("replica_affinity_keyed_total", "Requests with a prefix to route by.",
                         c.keyed),
                labelled("replica_affinity_kept_total",
                         "Of those, sent to their prefix's replica.", c.kept),
                labelled("replica_retried_total",
                         "Requests moved off a replica that could not be reached.", c.retried)]


def _add_stats(total: scheduler_pb2.StatsResponse, s: scheduler_pb2.StatsResponse) -> None:
    for f in scheduler_pb2.StatsResponse.DESCRIPTOR.fields:
        value = getattr(s, f.name)
        if f.name == "executor_connected":
            total.executor_connected = total.executor_connected or value
        elif f.name != "prefix_cache_hit_rate":
            setattr(total, f.name, getattr(total, f.name) + value)


def _unavailable(tried: list[Replica]) -> grpc.aio.AioRpcError:
    names = ", ".join(r.address for r in tried) or "none is up"
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), f"no scheduler replica could serve ({names})")


def connect(address: str, policy: str = "prefix") -> SchedulerClient | SchedulerReplicas:
    """One client for one address; a replica set for several, comma-separated, or for every
    address a DNS name resolves to (dns:///NAME:PORT, router/replica_dns.py)."""
    if address.startswith(replica_dns.PREFIX):
        host, port = replica_dns.parse(address)
        replicas = SchedulerReplicas(replica_dns.resolve(host, port), policy=policy)
        replicas.refresh, replicas.address = replica_dns.DnsRefresh(host, port), address
        return replicas
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    if len(addresses) == 1:
        return SchedulerClient(addresses[0])
    return SchedulerReplicas(addresses, policy=policy)
