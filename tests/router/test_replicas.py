"""Data parallelism behind one router (router/replicas.py): the choice of replica, then two real
scheduler + executor replicas behind a real router process.

The choice is checked against its own definition, independently computed: rendezvous hashing
over the prompt's leading whole blocks, yielding to load past the slack. End to end: requests
sharing a long prefix land on one replica, so the replicas' prefix caches find at least twice the
tokens that round-robin finds on the same kind of workload; a replica that dies loses no request
that had not started streaming.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from pagedserve.protos import scheduler_pb2, scheduler_pb2_grpc
from pagedserve.router.replicas import (
    AFFINITY_BLOCK,
    AFFINITY_TOKENS,
    Replica,
    affinity_key,
    pick,
)
from tests.e2e.conftest import free_port
from tests.prometheus_samples import sample
from tests.services.conftest import (
    EXECUTOR_SERVICE,
    SCHEDULER_SERVICE,
    Service,
    executor_argv,
    scheduler_argv,
)


def replicas(n: int) -> list[Replica]:
    return [Replica(f"unix:///r{i}.sock", client=None) for i in range(n)]  # type: ignore[arg-type]


def test_the_key_is_the_leading_whole_blocks() -> None:
    base = list(range(100, 100 + 3 * AFFINITY_BLOCK))
    assert affinity_key(base[:AFFINITY_BLOCK]) is None  # no whole block before the last token
    assert affinity_key([*base, 1]) == affinity_key([*base, 2, 3])  # the same 3 blocks
    assert affinity_key([*base, 1]) != affinity_key([7, *base])
    long = list(range(2 * AFFINITY_TOKENS))
    assert affinity_key(long) == affinity_key(long[:AFFINITY_TOKENS] + [0] * 50)


def test_each_prefix_goes_to_its_highest_scoring_replica() -> None:
    rs = replicas(3)
    chosen = []
    for i in range(300):
        key = affinity_key([i] * 40)
        got, kept = pick(rs, key, load_slack=8, now=0.0)
        want = max(rs, key=lambda r: hashlib.blake2b(key + r.address.encode(),
                                                     digest_size=8).digest())
        assert got is want and kept
        chosen.append(got.address)
    assert min(chosen.count(r.address) for r in rs) > 60  # spread over all three


def test_losing_a_replica_moves_only_its_own_prefixes() -> None:
    rs = replicas(4)
    keys = [affinity_key([i] * 40) for i in range(200)]
    before = [pick(rs, k, 8, 0.0)[0] for k in keys]
    rs[1].down_until = 10.0
    after = [pick(rs, k, 8, 1.0)[0] for k in keys]
    assert all(a is b for a, b in zip(before, after) if a is not rs[1])
    assert all(a is not rs[1] for a in after)


def test_load_past_the_slack_sends_the_request_to_the_least_loaded() -> None:
    rs = replicas(2)
    key = affinity_key([5] * 40)
    home, _ = pick(rs, key, 8, 0.0)
    other = rs[1] if home is rs[0] else rs[0]
    home.in_flight, other.in_flight = 10, 2
    assert pick(rs, key, 8, 0.0) == (home, True)  # 8 beyond the least: within the slack
    home.in_flight = 11
    assert pick(rs, key, 8, 0.0) == (other, False)
    assert pick(rs, None, 8, 0.0) == (other, False)  # no prefix: the least loaded


def test_a_failed_replica_backs_off_doubling() -> None:
    (r,) = replicas(1)
    r.failed(now=100.0)
    r.failed(now=100.0)
    assert not r.usable(101.9) and r.usable(102.0)
    assert pick([r], None, 8, 101.0) == (None, False)


# --- two real replicas ---------------------------------------------------------------------------


def _router(model: Path, schedulers: list[str], policy: str, log_dir: Path) -> tuple[Service, str]:
    port = free_port()
    service = Service("router", ["router", "--scheduler", ",".join(schedulers), "--model",
                                 str(model), "--port", str(port), "--grpc-port", "-1",
                                 "--replica-policy", policy], log_dir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                          timeout=2).models.list()
            return service, url
        except openai.APIError:
            assert service.proc.poll() is None, service.log()
            time.sleep(0.2)
    pytest.fail(f"router not up:\n{service.log()}")


def _hits(addresses: list[str]) -> int:
    total = 0
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            stats = scheduler_pb2_grpc.SchedulerStub(channel).Stats(scheduler_pb2.StatsRequest())
            total += stats.prefix_cache_hits
    return total


def _workload(client: openai.OpenAI, tag: int) -> None:
    """Six long shared prefixes, three requests each in a row, one at a time (load never
    intervenes). Round-robin sends a prefix's three requests to both replicas (one hit: the
    third); prefix affinity sends them to one (two hits)."""
    for i in range(18):
        prefix = f"Set {tag}, system prompt {i // 3}: " + "be brief and exact. " * 12
        client.completions.create(model="", prompt=prefix + f"Question {i}?", max_tokens=2,
                                  temperature=0)


def _replica(model: Path, log_dir: Path) -> tuple[Service, Service, str]:
    executor_address = f"unix://{log_dir}/executor.sock"
    address = f"unix://{log_dir}/scheduler.sock"
    executor = Service("executor", executor_argv(model, executor_address), log_dir)
    scheduler = Service("scheduler", scheduler_argv(executor_address, address), log_dir)
    executor.wait_serving(executor_address, EXECUTOR_SERVICE)
    scheduler.wait_serving(address, SCHEDULER_SERVICE)
    return executor, scheduler, address


@pytest.mark.timeout(300)
def test_prefix_affinity_doubles_cache_hits_and_survives_a_dead_replica(
        llama_dir: Path, tmp_path: Path) -> None:
    dirs = [Path(tempfile.mkdtemp(prefix="ps-rep-", dir="/tmp")) for _ in range(2)]
    services: list[Service] = []
    try:
        (e0, s0, a0), (e1, s1, a1) = (_replica(llama_dir, d) for d in dirs)
        services += [e0, s0, e1, s1]
        hits = {}
        for tag, policy in enumerate(("round_robin", "prefix")):
            router, url = _router(llama_dir, [a0, a1], policy, tmp_path)
            services.append(router)
            before = _hits([a0, a1])
            _workload(openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                                    timeout=60), tag)
            hits[policy] = _hits([a0, a1]) - before
            router.stop()
        assert hits["prefix"] >= 2 * hits["round_robin"] > 0, hits

        router, url = _router(llama_dir, [a0, a1], "prefix", tmp_path)
        services.append(router)
        s1.kill()
        e1.kill()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        for i in range(8):  # about half of them have the dead replica as their home
            out = client.completions.create(model="", prompt=f"After {i}: " + "x y z " * 8,
                                            max_tokens=3, temperature=0)
            assert out.choices[0].finish_reason == "length"
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert sample(metrics, "pagedserve_replica_up", replica=a1) == 0, metrics
        assert s0.proc.poll() is None
    finally:
        for service in services:
            service.kill()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
