"""--scheduler dns:///NAME:PORT: one replica per address the name resolves to (through the
system's own resolver for localhost), and a re-resolution that changes the set keeps the
replicas that stay (with their load and back-off) and drops the others."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pagedserve.router.replica_dns import DnsRefresh, parse
from pagedserve.router.replicas import SchedulerReplicas, connect


def test_localhost_resolves_to_its_loopback_addresses() -> None:
    expected = sorted({info[4][0] for info in socket.getaddrinfo("localhost", 50052,
                                                                 type=socket.SOCK_STREAM)})
    replicas = connect("dns:///localhost:50052")
    assert isinstance(replicas, SchedulerReplicas)
    got = [r.address.rsplit(":", 1)[0].strip("[]") for r in replicas.replicas]
    assert got == expected and all(r.address.endswith(":50052") for r in replicas.replicas)
    assert replicas.address == "dns:///localhost:50052"


@pytest.mark.parametrize("bad", ["dns:///nohost", "dns:///:50052", "dns:///h:0", "dns:///h:x"])
def test_a_malformed_name_is_refused_naming_the_flag(bad: str) -> None:
    with pytest.raises(ValueError, match="--scheduler"):
        parse(bad)


def test_an_unknown_name_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="does not resolve"):
        connect("dns:///no-such-host.invalid:50052")


def test_a_refresh_replaces_the_set_and_keeps_the_replicas_that_stay() -> None:
    answers = [["10.0.0.1:50052", "10.0.0.3:50052"], []]

    async def resolver(host: str, port: int) -> list[str]:
        return answers.pop(0)

    replicas = SchedulerReplicas(["10.0.0.1:50052", "10.0.0.2:50052"])
    kept = replicas.replicas[0]
    kept.in_flight = 3
    refresh = DnsRefresh("svc", 50052, resolver=resolver, every_s=0.0)

    async def run() -> None:
        replicas.set_addresses(await refresh.addresses())
        assert [r.address for r in replicas.replicas] == ["10.0.0.1:50052", "10.0.0.3:50052"]
        assert replicas.replicas[0] is kept and kept.in_flight == 3
        assert await refresh.addresses() is None  # found nothing: the set stays as it is

    asyncio.run(run())


def test_a_request_resolves_the_name_again_when_due() -> None:
    """generate() takes the refreshed set before it picks (here no scheduler listens at the new
    address, so the request fails UNAVAILABLE, having tried it)."""
    import grpc

    from pagedserve.protos import scheduler_pb2

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1:9"]  # the discard port: nothing serves gRPC there

    replicas = SchedulerReplicas(["127.0.0.1:7"])
    replicas.refresh = DnsRefresh("svc", 9, resolver=resolver, every_s=0.0)

    async def run() -> None:
        request = scheduler_pb2.ScheduleRequest(request_id="r", prompt_token_ids=[1, 2])
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in replicas.generate(request):
                pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(run())
    assert [r.address for r in replicas.replicas] == ["127.0.0.1:9"]
    assert replicas.replicas[0].failures == 1  # tried, and taken out for a back-off
