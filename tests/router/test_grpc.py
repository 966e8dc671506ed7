"""The public gRPC API (Generation, health, reflection) through generated stubs."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pagedserve.protos import generation_pb2 as pb
from pagedserve.protos import generation_pb2_grpc
from pagedserve.router.tokenizer import Tokenizer
from tests.router.conftest import SERVED
from tests.router.fake_scheduler import FakeScheduler
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def channel(router):
    with grpc.insecure_channel(router.grpc_address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> generation_pb2_grpc.GenerationStub:
    return generation_pb2_grpc.GenerationStub(channel)


def test_generate_from_text(stub, fake: FakeScheduler, tokenizer: Tokenizer) -> None:
    fake.tokens_per_message = 2
    req = pb.GenerateRequest(model=SERVED, prompt="import os", max_tokens=7, seed=9,
                             temperature=0.5, request_id="g-1")
    out = list(stub.Generate(req))
    ids = tokenizer.encode("import os")
    tokens = FakeScheduler.tokens_for(ids, 9, 7)
    assert [t for r in out for t in r.token_ids] == tokens
    assert "".join(r.text for r in out) == tokenizer.decode(tokens)
    assert all(r.request_id == "g-1" for r in out)
    assert out[-1].finish_reason == "length" and not any(r.finish_reason for r in out[:-1])
    u = out[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), 7, len(ids) + 7)
    sent = fake.requests[-1]
    assert sent.request_id == "g-1" and sent.sampling.temperature == 0.5


def test_generate_from_ids_and_chat(stub, fake: FakeScheduler, tokenizer: Tokenizer) -> None:
    out = list(stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[7, 8, 9]),
                                                max_tokens=3)))
    assert list(fake.requests[-1].prompt_token_ids) == [7, 8, 9]
    assert out[-1].usage.completion_tokens == 3
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi")])
    list(stub.Generate(pb.GenerateRequest(chat=chat, max_tokens=2, stop=["zz"])))
    want = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert list(fake.requests[-1].prompt_token_ids) == want
    assert fake.requests[-1].max_tokens == 2


def test_generate_errors(stub) -> None:
    cases = [(pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND),
             (pb.GenerateRequest(prompt="x", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT),
             (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT),
             (pb.GenerateRequest(prompt="x", max_tokens=10_000),
              grpc.StatusCode.INVALID_ARGUMENT)]
    for req, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req))
        assert e.value.code() == code, req


def test_cancel_aborts(stub, fake: FakeScheduler) -> None:
    fake.token_delay_s = 0.1  # 20 s of tokens: only the cancel ends it in time
    call = stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=200))
    next(call)
    call.cancel()
    wait_until(lambda: fake.cancelled and not fake.live, 15, "the cancel reaching the scheduler")


def test_tokenize_detokenize_models(stub, tokenizer: Tokenizer, fake: FakeScheduler) -> None:
    ids = stub.Tokenize(pb.TokenizeRequest(text="hello", add_special_tokens=True)).token_ids
    assert list(ids) == tokenizer.encode("hello")
    text = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=True)).text
    assert text == "hello"
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.id, m.max_model_len) for m in models] == [(SERVED, fake.max_model_len)]


def test_health_follows_scheduler(channel, fake: FakeScheduler) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(
            service="pagedserve.v1.Generation")).status

    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    wait_until(lambda: status() == serving, 5, "SERVING")
    fake.executor_connected = False
    wait_until(lambda: status() == not_serving, 5, "NOT_SERVING once the executor is gone")


def test_reflection_lists_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"pagedserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_reflection_off_by_default(llama_dir, scheduler_thread) -> None:
    from pagedserve.router.server import RouterThread

    with RouterThread(llama_dir, scheduler_thread.address, grpc_port=0) as r, \
            grpc.insecure_channel(r.grpc_address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            next(stub.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert generation_pb2_grpc.GenerationStub(ch).ListModels(
            pb.ListModelsRequest()).models[0].id == str(llama_dir)
