"""Request bodies that are not protobuf, sent to every method of every gRPC service we serve.

Issue 27: such a body got UNKNOWN (INTERNAL on the executor) and a multi-line traceback in the
log per call. Each must get INVALID_ARGUMENT, the log must stay JSON lines (rate-limited: a few
lines, not one per call), and the server must serve real requests afterwards. Bodies are random
bytes (fixed seed) that the method's request message does not parse.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.protos import (
    executor_pb2,
    executor_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

BODIES_PER_SERVER = 200
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def junk_bodies(method: MethodDescriptor, count: int, rng: random.Random) -> list[bytes]:
    """`count` random byte strings that do not parse as the method's request message."""
    parse = message_factory.GetMessageClass(method.input_type).FromString
    bodies: list[bytes] = []
    while len(bodies) < count:
        body = rng.randbytes(rng.randint(1, 48))
        try:
            parse(body)
        except Exception:
            bodies.append(body)
    return bodies


def call_with(channel: grpc.Channel, method: MethodDescriptor, body: bytes) -> grpc.StatusCode:
    """Sends the raw body to the method; the status the call ends with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kind[method.client_streaming, method.server_streaming](
        path, request_serializer=None, response_deserializer=None)  # bytes as they are
    request = iter([body]) if method.client_streaming else body
    try:
        if method.server_streaming:
            list(call(request, timeout=10))
        else:
            call(request, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def send_junk(address: str, services: list, log_path: Path) -> None:
    """BODIES_PER_SERVER junk bodies spread over every method; checks statuses and the log."""
    methods = [m for s in services for m in s.methods]
    rng = random.Random(27)
    start = log_path.stat().st_size
    codes: dict[str, set[str]] = {}
    with grpc.insecure_channel(address) as channel:
        for i, method in enumerate(methods):
            count = len(range(i, BODIES_PER_SERVER, len(methods)))
            for body in junk_bodies(method, count, rng):
                codes.setdefault(method.full_name, set()).add(call_with(channel, method, body).name)
    assert codes == {m.full_name: {"INVALID_ARGUMENT"} for m in methods}
    new = log_path.read_bytes()[start:].decode(errors="replace")
    assert "Traceback" not in new, new[-3000:]
    lines = [json.loads(line) for line in new.splitlines()]  # every line is JSON
    refusals = [r for r in lines if r.get("event", "").startswith("invalid request body")]
    assert 1 <= len(refusals) <= BODIES_PER_SERVER // 10, refusals  # rate-limited
    assert len(refusals) + sum(r["suppressed"] for r in refusals) <= BODIES_PER_SERVER


def generate_through_scheduler(address: str) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.ScheduleRequest(request_id="real", prompt_token_ids=[11, 12],
                                                max_tokens=2, ignore_eos=True)
        return [t for out in stub.Generate(request, timeout=30) for t in out.token_ids]


def test_router_refuses_junk_and_still_serves(served: dict) -> None:
    address, router = served["router"]
    send_junk(address, [generation_pb2.DESCRIPTOR.services_by_name["Generation"], HEALTH],
              router.log_path)
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(prompt_token_ids=generation_pb2.TokenIds(
            ids=[11, 12]), max_tokens=2, ignore_eos=True)
        assert sum(len(r.token_ids) for r in stub.Generate(request, timeout=30)) == 2


def test_scheduler_refuses_junk_and_still_serves(served: dict) -> None:
    address, scheduler = served["scheduler"]
    send_junk(address, [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"], HEALTH],
              scheduler.log_path)
    assert len(generate_through_scheduler(address)) == 2


def test_executor_refuses_junk_and_still_serves(served: dict) -> None:
    address, executor = served["executor"]
    send_junk(address, [executor_pb2.DESCRIPTOR.services_by_name["Executor"], HEALTH],
              executor.log_path)
    with grpc.insecure_channel(address) as channel:
        assert executor_pb2_grpc.ExecutorStub(channel).Describe(
            executor_pb2.DescribeRequest(), timeout=10).num_kv_blocks > 0
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    # junk Execute streams superseded the scheduler's; it reconnects and recomputes
    assert len(generate_through_scheduler(served["scheduler"][0])) == 2
