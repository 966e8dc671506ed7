"""An executor killed mid-generation and started again: every request finishes, none is lost, and
greedy tokens are those of an undisturbed run (the scheduler refills the new executor by recompute)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from pagedserve.protos import scheduler_pb2, scheduler_pb2_grpc
from tests.services.conftest import (
    EXECUTOR_SERVICE,
    MAX_TOKENS,
    Service,
    executor_and_scheduler,
    executor_argv,
    prompts,
)
from tests.waiting import wait_until_async


async def _generate_through_a_crash(address: str, crash, restart) -> tuple[dict, dict, list]:
    """Streams every prompt; once each has tokens, `crash()`; once the scheduler reports the
    executor gone, `restart()`."""
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts()}
    reasons: dict[str, str] = {}
    seen_disconnected = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        started = {rid: asyncio.Event() for rid in prompts()}

        async def stream(rid: str, prompt: list[int]) -> None:
            request = scheduler_pb2.ScheduleRequest(request_id=rid, prompt_token_ids=prompt,
                                                    max_tokens=MAX_TOKENS, ignore_eos=True)
            async for out in stub.Generate(request, timeout=60):
                tokens[rid] += out.token_ids
                started[rid].set()
                if out.finished:
                    reasons[rid] = out.finish_reason

        tasks = [asyncio.create_task(stream(rid, p)) for rid, p in prompts().items()]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 30)
        crash()
        at_crash = {rid: len(t) for rid, t in tokens.items()}

        async def disconnected() -> bool:
            stats = await stub.Stats(scheduler_pb2.StatsRequest(), timeout=5)
            return not stats.executor_connected

        # The scheduler must notice the crash (and say so in Stats) before the restart.
        seen_disconnected.append(await wait_until_async(disconnected, 10, "Stats showing the crash"))
        await asyncio.to_thread(restart)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return tokens, reasons, [at_crash, seen_disconnected]


def test_killed_executor_is_refilled_by_recompute(llama_dir: Path, sock_dir: Path,
                                                  reference_tokens) -> None:
    executor_address = f"unix://{sock_dir}/executor.sock"
    with executor_and_scheduler(llama_dir, sock_dir) as (executor, _):
        replacement: list[Service] = []

        def restart() -> None:
            service = Service("executor-2", executor_argv(llama_dir, executor_address), sock_dir)
            replacement.append(service)
            service.wait_serving(executor_address, EXECUTOR_SERVICE)

        try:
            tokens, reasons, (at_crash, disconnected) = asyncio.run(_generate_through_a_crash(
                f"unix://{sock_dir}/scheduler.sock", executor.kill, restart))
        finally:
            for service in replacement:
                assert service.stop() == 0, service.log()
    assert all(0 < n < MAX_TOKENS for n in at_crash.values()), at_crash  # killed mid-generation
    assert disconnected == [True]
    assert reasons == {rid: "length" for rid in prompts()}
    assert tokens == reference_tokens
