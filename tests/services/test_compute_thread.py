"""The served executor loads and steps its model on one thread, whatever gRPC thread a call comes
on (executor/compute_thread.py says why: one OpenMP team per process)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pagedserve.executor.compute_thread import ComputeThread
from pagedserve.executor.server import ExecutorService, build_server
from pagedserve.protos import executor_pb2
from pagedserve.scheduler.executor_client import ExecutorGone, GrpcExecutorClient


def test_calls_run_in_order_on_one_other_thread_and_raise_there() -> None:
    compute = ComputeThread()
    seen: list[tuple[int, int]] = []
    results = [compute.run(lambda i=i: seen.append((i, threading.get_ident())) or i * i)
               for i in range(5)]
    assert results == [0, 1, 4, 9, 16]
    assert [i for i, _ in seen] == list(range(5))
    assert len({ident for _, ident in seen}) == 1
    assert seen[0][1] != threading.get_ident()
    with pytest.raises(KeyError, match="missing"):
        compute.run({}.__getitem__, "missing")
    assert compute.run(compute.run, lambda: 7) == 7  # a call from a call does not wait on itself
    compute.close()


class _ThreadRecordingExecutor:
    """Stands in for executor.Executor: records the thread of its construction and of each step."""

    def __init__(self) -> None:
        self.threads = [threading.get_ident()]

    def describe(self) -> executor_pb2.DescribeResponse:
        return executor_pb2.DescribeResponse(model="recording")

    def execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        self.threads.append(threading.get_ident())
        return executor_pb2.StepResult(step_id=plan.step_id)


def test_served_steps_run_on_the_thread_that_built_the_executor(tmp_path: Path) -> None:
    service = ExecutorService()
    address = f"unix://{tmp_path}/executor.sock"
    server, _ = build_server(service, address)
    server.start()
    try:
        service.load(_ThreadRecordingExecutor)
        clients = [GrpcExecutorClient(address) for _ in range(2)]  # the second supersedes the first
        clients[0].execute(executor_pb2.StepPlan(step_id=0))
        steps = [clients[1].execute(executor_pb2.StepPlan(step_id=i)) for i in range(1, 4)]
        for client in clients:
            client.close()
    finally:
        server.stop(0).wait()
    assert [s.step_id for s in steps] == [1, 2, 3]
    threads = service._executor.threads
    assert len(threads) == 5 and len(set(threads)) == 1
    assert threads[0] != threading.get_ident()


def test_a_step_that_fails_mid_forward_leaves_nothing_held_for_the_next_stream(
        tmp_path: Path, llama_dir: Path) -> None:
    """A step can fail after the executor took in its new requests (a kernel error, memory):
    the reconnecting scheduler resends them as new, which must be accepted, not refused forever
    as already held."""
    from pagedserve.executor.config import ExecutorConfig
    from pagedserve.executor.executor import Executor

    service = ExecutorService()
    address = f"unix://{tmp_path}/executor.sock"
    server, _ = build_server(service, address)
    server.start()
    plan = executor_pb2.StepPlan(step_id=0, new_requests=[executor_pb2.NewRequest(
        request_id="a", prompt_token_ids=[5, 6, 7], block_ids=[0], num_scheduled_tokens=3)])
    try:
        service.load(lambda: Executor(ExecutorConfig(model=str(llama_dir), dtype="float32",
                                                     num_kv_blocks=16, max_model_len=64)))
        model = service._executor.model
        forward = model.forward

        def fail_once(*args, **kwargs):
            model.forward = forward
            raise RuntimeError("kernel failed")

        model.forward = fail_once
        first = GrpcExecutorClient(address)
        with pytest.raises(ExecutorGone, match="kernel failed"):
            first.execute(plan)
        second = GrpcExecutorClient(address)
        result = second.execute(plan)
        assert [o.request_id for o in result.outputs] == ["a"]
        first.close()
        second.close()
    finally:
        server.stop(0).wait()
