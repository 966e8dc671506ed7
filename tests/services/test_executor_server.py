"""The executor gRPC server, as a real process on a unix socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagedserve.health import grpc_serving
from pagedserve.protos import executor_pb2
from pagedserve.scheduler.executor_client import ExecutorGone, GrpcExecutorClient
from tests.services.conftest import (
    BLOCK_SIZE,
    EXECUTOR_SERVICE,
    MAX_MODEL_LEN,
    NUM_KV_BLOCKS,
    Service,
    start_executor,
)


@pytest.fixture(scope="module")
def executor(llama_dir: Path, sock_dir: Path) -> Iterator[tuple[str, Service]]:
    address = f"unix://{sock_dir}/executor.sock"
    service = start_executor(llama_dir, address, sock_dir)
    yield address, service
    assert service.stop() == 0, service.log()


def _plans() -> list[executor_pb2.StepPlan]:
    """Two prompts in one step, four decode steps, then one request forgotten."""
    a = list(range(100, 120))  # 20 tokens: blocks 0, 1
    b = list(range(300, 307))  # 7 tokens: block 2
    plans = [executor_pb2.StepPlan(step_id=0, new_requests=[
        executor_pb2.NewRequest(request_id="a", prompt_token_ids=a, block_ids=[0, 1],
                                num_scheduled_tokens=len(a)),
        executor_pb2.NewRequest(request_id="b", prompt_token_ids=b, block_ids=[2],
                                num_scheduled_tokens=len(b),
                                sampling=executor_pb2.SamplingParams(logprobs=3)),
    ])]
    for step in range(1, 5):
        plans.append(executor_pb2.StepPlan(step_id=step, continuing_requests=[
            executor_pb2.ContinuingRequest(request_id="a", num_scheduled_tokens=1),
            executor_pb2.ContinuingRequest(request_id="b", num_scheduled_tokens=1)]))
    plans.append(executor_pb2.StepPlan(step_id=5, forget_request_ids=["a"], continuing_requests=[
        executor_pb2.ContinuingRequest(request_id="b", num_scheduled_tokens=1)]))
    return plans


def test_describe_reports_the_model_and_its_kv_capacity(executor, llama_dir: Path) -> None:
    address, _ = executor
    config = json.loads((llama_dir / "config.json").read_text())
    desc = GrpcExecutorClient(address).describe()
    assert desc.architecture == "LlamaForCausalLM"
    assert (desc.block_size, desc.num_kv_blocks) == (BLOCK_SIZE, NUM_KV_BLOCKS)
    assert desc.max_model_len == MAX_MODEL_LEN
    assert desc.vocab_size == config["vocab_size"]
    assert desc.num_layers == config["num_hidden_layers"]
    assert desc.num_kv_heads == config["num_key_value_heads"]
    assert desc.device == "cpu" and desc.dtype == "float32"
    eos = config["eos_token_id"]
    assert set(desc.eos_token_ids) >= set(eos if isinstance(eos, list) else [eos])
    assert grpc_serving(address) and grpc_serving(address, EXECUTOR_SERVICE)


def test_reflection_is_off_by_default(executor) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(executor[0]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_execute_stream_gives_the_in_process_results_in_order(executor, llama_dir) -> None:
    import torch

    from pagedserve.executor.config import ExecutorConfig
    from pagedserve.executor.executor import Executor

    torch.set_num_threads(1)
    client = GrpcExecutorClient(executor[0])
    remote = [client.execute(plan) for plan in _plans()]
    client.close()
    local = Executor(ExecutorConfig(model=str(llama_dir), dtype="float32", block_size=BLOCK_SIZE,
                                    num_kv_blocks=NUM_KV_BLOCKS, max_model_len=MAX_MODEL_LEN))
    expected = [local.execute(plan) for plan in _plans()]
    assert [r.step_id for r in remote] == list(range(6))
    assert [[o.token_ids for o in r.outputs] for r in remote] == \
        [[o.token_ids for o in r.outputs] for r in expected]
    assert len(remote[0].outputs[1].top_logprobs[0].token_ids) == 3  # logprobs travel too
    assert all(r.execute_seconds > 0 for r in remote + expected)  # timed in-process and remote
    for got, want in zip(remote, expected):
        for g, w in zip(got.outputs, want.outputs):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
            assert [t.token_ids for t in g.top_logprobs] == [t.token_ids for t in w.top_logprobs]
            assert [v for t in g.top_logprobs for v in t.logprobs] == pytest.approx(
                [v for t in w.top_logprobs for v in t.logprobs], abs=1e-4)


def test_a_new_stream_supersedes_the_old_one_and_starts_clean(executor) -> None:
    """A reconnecting scheduler resends its requests whole; the executor must not hold old ones."""
    first, second = GrpcExecutorClient(executor[0]), GrpcExecutorClient(executor[0])
    plans = _plans()
    first.execute(plans[0])
    assert second.execute(plans[0]).step_id == 0  # "a" and "b" again: accepted as new
    with pytest.raises(ExecutorGone):
        first.execute(plans[1])
    assert second.execute(plans[1]).step_id == 1
    first.close()
    second.close()
