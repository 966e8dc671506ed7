"""Two concurrent public Generate calls with one request_id: the second gets ALREADY_EXISTS naming
the id (issue 27: it got `INTERNAL: scheduler error ALREADY_EXISTS`), the first runs on.

Real executor and scheduler processes, real routers in threads: one router (its own session
notices the id is running) and two routers on one scheduler (the scheduler notices).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagedserve.protos import generation_pb2, generation_pb2_grpc
from pagedserve.router.server import RouterThread
from tests.services.conftest import MAX_MODEL_LEN, executor_and_scheduler

MAX_TOKENS = MAX_MODEL_LEN - 16  # long enough to be still running when the twin arrives


@pytest.fixture(scope="module")
def routers(llama_dir: Path, sock_dir: Path) -> Iterator[tuple[str, str]]:
    """The gRPC addresses of two routers on one scheduler."""
    with executor_and_scheduler(llama_dir, sock_dir):
        scheduler = f"unix://{sock_dir}/scheduler.sock"
        with RouterThread(llama_dir, scheduler, grpc_port=0) as one, \
                RouterThread(llama_dir, scheduler, grpc_port=0) as two:
            yield one.grpc_address, two.grpc_address


def request(request_id: str, max_tokens: int = MAX_TOKENS) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=generation_pb2.TokenIds(ids=[11, 12, 13]),
        max_tokens=max_tokens, ignore_eos=True)


def twin_while_running(first: str, second: str, request_id: str) -> grpc.RpcError:
    """Starts request_id on router `first`; once it streams, the same id on `second`. Returns
    the second call's error, after checking the first ran to its end."""
    with grpc.insecure_channel(first) as a, grpc.insecure_channel(second) as b:
        running = generation_pb2_grpc.GenerationStub(a).Generate(request(request_id), timeout=60)
        tokens = len(next(running).token_ids)
        with pytest.raises(grpc.RpcError) as twin:
            list(generation_pb2_grpc.GenerationStub(b).Generate(request(request_id, 4),
                                                                 timeout=30))
        last = None
        for last in running:
            tokens += len(last.token_ids)
        assert last is not None and last.finish_reason == "length"
        assert tokens == MAX_TOKENS, "the first call was disturbed"
    return twin.value


@pytest.mark.parametrize("where", ["same router", "two routers"])
def test_second_call_with_a_running_id_gets_already_exists(routers: tuple[str, str],
                                                           where: str) -> None:
    one, two = routers
    rid = f"dup-{where.replace(' ', '-')}"
    error = twin_while_running(one, one if where == "same router" else two, rid)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error
    assert rid in error.details(), error.details()
    with grpc.insecure_channel(two) as channel:  # the id is free again once it finished
        again = generation_pb2_grpc.GenerationStub(channel).Generate(request(rid, 4), timeout=30)
        assert sum(len(r.token_ids) for r in again) == 4
