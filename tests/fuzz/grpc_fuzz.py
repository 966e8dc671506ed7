"""Fuzzing every gRPC method we serve with messages that parse (tests/fuzz/messages.py): random
ones and mutations of a valid seed, one to three per call on client-streaming methods, and on
server-streaming methods the client reads at most three answers and then cancels (aborts are
fuzzed too). Every call must end with a status a correct server may give to a bad or cancelled
request: never INTERNAL or UNKNOWN (a bug), UNAVAILABLE (a crash) or DEADLINE_EXCEEDED (a hang).

    python -m tests.fuzz.grpc_fuzz ADDRESS SERVICE --count 10000 [--seed N]

runs the long form against one running server (SERVICE: generation, scheduler or executor);
tests/services/test_grpc_fuzz.py runs a short one in CI on all three.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from collections.abc import Iterable

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from pagedserve.protos import executor_pb2, generation_pb2, scheduler_pb2
from tests.fuzz.messages import mutate, random_message

C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED,
           C.FAILED_PRECONDITION, C.OUT_OF_RANGE, C.ABORTED}
READ_AT_MOST = 3
SERVICES = {"generation": generation_pb2.DESCRIPTOR.services_by_name["Generation"],
            "scheduler": scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"],
            "executor": executor_pb2.DESCRIPTOR.services_by_name["Executor"]}


def seeds() -> dict[str, Message]:
    """A valid request per input type, for mutation."""
    prompt = [11, 12, 13]
    schedule = scheduler_pb2.ScheduleRequest(request_id="fuzz-seed", prompt_token_ids=prompt,
                                             max_tokens=3, ignore_eos=True)
    return {
        "pagedserve.v1.GenerateRequest": generation_pb2.GenerateRequest(
            prompt_token_ids=generation_pb2.TokenIds(ids=prompt), max_tokens=3),
        "pagedserve.v1.TokenizeRequest": generation_pb2.TokenizeRequest(text="hello"),
        "pagedserve.v1.DetokenizeRequest": generation_pb2.DetokenizeRequest(token_ids=prompt),
        "pagedserve.v1.ScheduleRequest": schedule,
        "pagedserve.v1.SessionRequest": scheduler_pb2.SessionRequest(schedule=schedule),
        "pagedserve.v1.AbortRequest": scheduler_pb2.AbortRequest(request_id="fuzz-seed"),
        "pagedserve.v1.StepPlan": executor_pb2.StepPlan(step_id=1, new_requests=[
            executor_pb2.NewRequest(request_id="fuzz-seed", prompt_token_ids=prompt,
                                    block_ids=[0], num_scheduled_tokens=3)]),
    }


def draw(method: MethodDescriptor, rng: random.Random, seed_of: dict[str, Message]) -> Message:
    seed = seed_of.get(method.input_type.full_name)
    if seed is not None and rng.random() < 0.5:
        return mutate(seed, rng)
    return random_message(method.input_type, rng)


def call(channel: grpc.Channel, method: MethodDescriptor, requests: list[Message],
         timeout: float) -> grpc.StatusCode:
    """The status the call ends with; CANCELLED by us (after READ_AT_MOST answers) counts OK."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub = kind[method.client_streaming, method.server_streaming](
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=None)
    request: Message | Iterable[Message] = iter(requests) if method.client_streaming \
        else requests[0]
    try:
        if not method.server_streaming:
            stub(request, timeout=timeout)
            return C.OK
        answers = stub(request, timeout=timeout)
        for i, _ in enumerate(answers):
            if i + 1 >= READ_AT_MOST:
                answers.cancel()
                return C.OK
        return C.OK
    except grpc.RpcError as e:
        return C.OK if e.code() == C.CANCELLED and method.server_streaming else e.code()


def fuzz(channel: grpc.Channel, service: ServiceDescriptor, count: int, rng: random.Random,
         timeout: float = 30.0) -> Counter:
    """`count` calls spread evenly over the service's methods: Counter of (method, status)."""
    seed_of, statuses = seeds(), Counter()
    methods = list(service.methods)
    for i in range(count):
        method = methods[i % len(methods)]
        n = rng.choice((1, 1, 2, 3)) if method.client_streaming else 1
        requests = [draw(method, rng, seed_of) for _ in range(n)]
        statuses[method.name, call(channel, method, requests, timeout).name] += 1
    return statuses


def bad(statuses: Counter) -> dict:
    return {k: v for k, v in statuses.items() if C[k[1]] not in ALLOWED}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address")
    p.add_argument("service", choices=sorted(SERVICES))
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        statuses = fuzz(channel, SERVICES[args.service], args.count, random.Random(args.seed))
    for (method, code), n in sorted(statuses.items()):
        print(f"{method:12} {code:20} {n}")
    print(f"{sum(statuses.values())} calls, {sum(bad(statuses).values())} with a bad status")
    return 1 if bad(statuses) else 0


if __name__ == "__main__":
    raise SystemExit(main())
