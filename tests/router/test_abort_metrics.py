"""Aborted requests are counted by reason in /metrics (pagedserve_request_abort_total): an HTTP
client that goes away (streamed or not), a cancelled gRPC call; a request that completes counts
nothing, and an abort is no failure."""

from __future__ import annotations

import re
import time

import grpc
import httpx
import pytest

from pagedserve.protos import generation_pb2 as pb
from pagedserve.protos import generation_pb2_grpc
from tests.router.conftest import SERVED
from tests.router.fake_scheduler import FakeScheduler
from tests.waiting import wait_until

_SAMPLE = re.compile(r'pagedserve_(request_abort|request_failure)_total\{\w+="(\w+)"\} (\S+)')
BODY = {"model": SERVED, "prompt": "def fibonacci(n):", "max_tokens": 200}


def counters(router) -> dict[tuple[str, str], float]:
    """(metric, label value) -> value of the abort and failure counters, as /metrics shows."""
    text = httpx.get(router.base_url + "/metrics").text
    return {(m[1], m[2]): float(m[3]) for m in map(_SAMPLE.fullmatch, text.splitlines()) if m}


def aborted(router, reason: str) -> float:
    return counters(router).get(("request_abort", reason), 0.0)


def wait_for_one_more(router, before: dict, reason: str) -> None:
    """The abort is counted once the router notices it, a moment after the client left."""
    wait_until(lambda: aborted(router, reason) >= before.get(("request_abort", reason), 0.0) + 1,
               15, f"a {reason} abort counted")
    after = counters(router)
    changed = {k for k in set(before) | set(after) if before.get(k, 0.0) != after.get(k, 0.0)}
    assert changed == {("request_abort", reason)}, (before, after)  # once, and no failure
    assert after[("request_abort", reason)] == before.get(("request_abort", reason), 0.0) + 1


def test_streamed_client_disconnect_is_counted(router, fake: FakeScheduler) -> None:
    fake.token_delay_s = 0.1  # 20 s of tokens: the client leaves long before the end
    before = counters(router)
    with httpx.stream("POST", router.base_url + "/v1/completions",
                      json={**BODY, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: {")
    wait_for_one_more(router, before, "client_disconnect")


def test_non_streamed_client_disconnect_is_counted(router, fake: FakeScheduler) -> None:
    fake.token_delay_s = 0.1
    before = counters(router)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.base_url + "/v1/chat/completions", timeout=0.3,
                   json={**BODY, "prompt": None, "messages": [{"role": "user", "content": "Hi"}]})
    wait_for_one_more(router, before, "client_disconnect")


def test_cancelled_grpc_call_is_counted(router, fake: FakeScheduler) -> None:
    fake.token_delay_s = 0.1
    before = counters(router)
    with grpc.insecure_channel(router.grpc_address) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="x", max_tokens=200))
        next(call)
        call.cancel()
        wait_for_one_more(router, before, "cancelled")


def test_completed_requests_count_no_abort(router, fake: FakeScheduler) -> None:
    before = counters(router)
    assert before[("request_abort", "client_disconnect")] >= 0  # shown before any abort
    url = router.base_url + "/v1/completions"
    assert httpx.post(url, json={**BODY, "max_tokens": 4}).status_code == 200
    with httpx.stream("POST", url, json={**BODY, "max_tokens": 4, "stream": True}) as r:
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    with grpc.insecure_channel(router.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        assert list(stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=4)))[-1].finish_reason
    time.sleep(0.3)  # time for a (wrongly) noticed disconnect to be counted
    after = counters(router)
    assert {k: v for k, v in after.items() if k[0] == "request_abort"} == {
        k: v for k, v in before.items() if k[0] == "request_abort"}
