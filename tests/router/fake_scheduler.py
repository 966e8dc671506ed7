"""A fake Scheduler gRPC service (grpc.aio, protos/scheduler.proto) for the router's tests.

Outputs are deterministic: a pseudo-random token sequence drawn from (prompt ids, seed), so a test
can compute what a request will produce with `FakeScheduler.tokens_for`. It honours max_tokens,
EOS (at output number `eos_at`, when set), stop_token_ids, ignore_eos and min_tokens; cancelled or
aborted requests are recorded; Stats counts live requests. With sampling.logprobs set, each token
comes with `logprob_of(token)` and `top_of(token, k)`: made up, but deterministic. Session runs
each of its requests through Generate and batches whatever outputs are waiting, as the real
scheduler's Session batches a step's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading

import grpc

from pagedserve.protos import executor_pb2, scheduler_pb2, scheduler_pb2_grpc

FIRST_ID = 6  # ids below are the test model's special tokens


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, vocab_size: int = 2048, max_model_len: int = 256,
                 eos_ids: tuple[int, ...] = (1, 3)) -> None:
        self.vocab_size, self.max_model_len, self.eos_ids = vocab_size, max_model_len, eos_ids
        self.reset()

    def reset(self) -> None:
        self.requests: list[scheduler_pb2.ScheduleRequest] = []
        self.live: set[str] = set()
        self.cancelled: list[str] = []
        self.completed: list[str] = []
        self._abort: set[str] = set()
        self.eos_at: int | None = None  # emit EOS as output number eos_at (1-based)
        self.token_delay_s = 0.0
        self.tokens_per_message = 1
        self.executor_connected = True
        self.refuse: grpc.StatusCode | None = None  # abort every Generate with this status
        self.fail_after: int | None = None  # abort with INTERNAL after this many messages
        self.script: list[int] | None = None  # emit exactly these tokens, then EOS

    @staticmethod
    def tokens_for(prompt_ids: list[int], seed: int | None, count: int,
                   vocab_size: int = 2048) -> list[int]:
        rng = random.Random(f"{seed}:{','.join(map(str, prompt_ids))}")
        return [rng.randrange(FIRST_ID, vocab_size) for _ in range(count)]

    @staticmethod
    def logprob_of(token_id: int) -> float:
        return -((token_id * 7919) % 997) / 100.0 - 0.01

    @staticmethod
    def top_of(token_id: int, k: int, vocab_size: int = 2048) -> list[tuple[int, float]]:
        return [(FIRST_ID + (token_id * 31 + r) % (vocab_size - FIRST_ID), -0.05 * (r + 1))
                for r in range(k)]

    def _with_logprobs(self, out: scheduler_pb2.TokenOutput, k: int | None) -> None:
        if k is None:
            return
        out.logprobs.extend(self.logprob_of(t) for t in out.token_ids)
        for t in out.token_ids:
            top = self.top_of(t, k, self.vocab_size)
            out.top_logprobs.add(token_ids=[i for i, _ in top], logprobs=[lp for _, lp in top])

    def _outputs(self, req: scheduler_pb2.ScheduleRequest) -> tuple[list[int], str]:
        """The whole output of a request and its finish reason."""
        seed = req.sampling.seed if req.sampling.HasField("seed") else None
        budget = min(req.max_tokens, self.max_model_len - len(req.prompt_token_ids))
        tokens = self.tokens_for(list(req.prompt_token_ids), seed, budget, self.vocab_size)
        if self.script is not None:
            tokens = [*self.script, self.eos_ids[0]][:budget]
        if self.eos_at is not None and self.eos_at <= budget:
            tokens[self.eos_at - 1] = self.eos_ids[0]
        stops = set(req.stop_token_ids) | (set() if req.ignore_eos else set(self.eos_ids))
        for i, t in enumerate(tokens):
            if t in stops and i + 1 >= req.min_tokens:
                return tokens[: i + 1], "stop"
        return tokens, "length"

    async def Generate(self, request, context):
        rid = request.request_id
        self.requests.append(request)
        if self.refuse is not None:
            await context.abort(self.refuse, "refused by the fake")
        self.live.add(rid)
        tokens, reason = self._outputs(request)
        step = max(1, self.tokens_per_message)
        k = request.sampling.logprobs if request.sampling.HasField("logprobs") else None
        try:
            for sent, start in enumerate(range(0, len(tokens), step)):
                if self.fail_after is not None and sent >= self.fail_after:
                    await context.abort(grpc.StatusCode.INTERNAL, "the fake broke down")
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if rid in self._abort:
                    yield scheduler_pb2.TokenOutput(request_id=rid, finished=True,
                                                    finish_reason="abort")
                    return
                chunk = tokens[start:start + step]
                last = start + step >= len(tokens)
                out = scheduler_pb2.TokenOutput(
                    request_id=rid, token_ids=chunk, finished=last,
                    finish_reason=reason if last else "",
                    num_prompt_tokens=len(request.prompt_token_ids))
                self._with_logprobs(out, k)
                yield out
            self.completed.append(rid)
        except (asyncio.CancelledError, GeneratorExit):
            # a cancel that lands while gRPC writes a message closes this generator at its yield
            # (GeneratorExit) instead of cancelling it in a sleep
            self.cancelled.append(rid)
            raise
        finally:
            self.live.discard(rid)

    async def Session(self, request_iterator, context):
        outbox: asyncio.Queue[scheduler_pb2.TokenOutput] = asyncio.Queue()
        tasks: dict[str, asyncio.Task] = {}
        reader = asyncio.create_task(self._read_session(request_iterator, outbox, tasks))
        try:
            while True:
                batch = [await outbox.get()]
                while not outbox.empty():
                    batch.append(outbox.get_nowait())
                yield scheduler_pb2.TokenOutputBatch(outputs=batch)
        finally:
            reader.cancel()
            for task in tasks.values():
                task.cancel()

    async def _read_session(self, request_iterator, outbox, tasks) -> None:
        async for msg in request_iterator:
            rid = msg.schedule.request_id or msg.cancel.request_id
            if msg.WhichOneof("kind") == "schedule":
                tasks[rid] = asyncio.create_task(self._session_request(msg.schedule, outbox, tasks))
            elif rid in tasks:
                tasks.pop(rid).cancel()

    async def _session_request(self, request, outbox, tasks) -> None:
        try:
            async for out in self.Generate(request, _SessionCallContext()):
                outbox.put_nowait(out)
        except _Aborted as e:
            outbox.put_nowait(scheduler_pb2.TokenOutput(
                request_id=request.request_id, finished=True, error_code=e.code.value[0],
                error_message=e.details))
        finally:
            if tasks.get(request.request_id) is asyncio.current_task():
                del tasks[request.request_id]

    async def Abort(self, request, context):
        found = request.request_id in self.live
        self._abort.add(request.request_id)
        return scheduler_pb2.AbortResponse(found=found)

    async def Stats(self, request, context):
        return scheduler_pb2.StatsResponse(
            num_running=len(self.live), num_waiting=0, blocks_total=64, blocks_free=60,
            blocks_used=4, executor_connected=self.executor_connected, steps=7,
            step_schedule_seconds=0.5, step_rpc_seconds=2.25, step_execute_seconds=2.0,
            step_apply_seconds=0.125, step_running_requests_sum=21)

    async def ModelInfo(self, request, context):
        return executor_pb2.DescribeResponse(
            model="fake", architecture="LlamaForCausalLM", dtype="float32",
            vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            eos_token_ids=list(self.eos_ids), block_size=16, num_kv_blocks=64, device="cpu")


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _SessionCallContext:
    """What Generate needs of a call's context, for one request of a Session."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class FakeSchedulerThread:
    """The fake served on `address` (e.g. 'unix:///tmp/x.sock') from a background thread."""

    def __init__(self, address: str, **kwargs) -> None:
        self.address = address
        self.servicer = FakeScheduler(**kwargs)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True,
                                        name="fake-scheduler")

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, server)
        server.add_insecure_port(self.address)
        await server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await server.stop(0.5)

    def start(self) -> FakeSchedulerThread:
        self._thread.start()
        assert self._ready.wait(10), "fake scheduler did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
