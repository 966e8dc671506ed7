"""What the HTTP and gRPC fronts share: tokenizer, scheduler client, model facts, metrics.

The router is stateless: everything here can be rebuilt from the model directory and the
scheduler's address. Model facts (max_model_len, EOS ids) come from the scheduler's ModelInfo,
fetched on first need and kept once it answered.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from protos import executor_pb2, scheduler_pb2
from router.errors import (
    RouterError,
    context_length_exceeded,
    from_grpc,
    invalid_request,
    model_not_found,
)
from router.generation import Delta, GenerationParams, generate, merge
from router.metrics import Metrics
from router.scheduler_client import SchedulerClient
from router.tokenizer import Tokenizer


def random_id() -> str:
    return uuid.uuid4().hex


class RouterCore:
    def __init__(self, model_dir: str | Path, scheduler_addr: str,
                 served_model_name: str | None = None, tokenizer: Tokenizer | None = None,
                 client: SchedulerClient | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.model_name = served_model_name or str(model_dir)
        self.tokenizer = tokenizer or Tokenizer.from_dir(self.model_dir)
        self.client = client or SchedulerClient(scheduler_addr)
        self.metrics = Metrics()
        self.created = int(time.time())
        self._info: executor_pb2.DescribeResponse | None = None

    # -- model facts ------------------------------------------------------------------------
    async def model_info(self) -> executor_pb2.DescribeResponse:
        if self._info is None:
            try:
                self._info = await self.client.model_info()
            except grpc.aio.AioRpcError as e:
                raise from_grpc(e) from e
        return self._info

    async def max_model_len(self) -> int:
        return (await self.model_info()).max_model_len

    def check_model(self, model: str | None) -> None:
        """An empty model means the served one; any other name must match it."""
        if model and model not in (self.model_name, str(self.model_dir)):
            raise model_not_found(model)

    async def stats(self) -> scheduler_pb2.StatsResponse | None:
        try:
            return await self.client.stats()
        except grpc.aio.AioRpcError:
            return None

    # -- requests ---------------------------------------------------------------------------
    async def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None,
                                 param: str = "prompt") -> int:
        """max_tokens as asked, or all the room the context leaves; 400 when it does not fit."""
        max_len = await self.max_model_len()
        room = max_len - prompt_len
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise context_length_exceeded(max_len, prompt_len, max_tokens, param)
        return room if max_tokens is None else max_tokens

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self._info.vocab_size if self._info and self._info.vocab_size else None
        vocab = vocab or self.tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise invalid_request(f"token ids must be in [0, {vocab})", param)

    async def stream(self, request_id: str, prompt_ids: list[int], params: GenerationParams,
                     n: int = 1, endpoint: str = "") -> AsyncIterator[Delta]:
        """Deltas of all n choices interleaved; choice i runs as scheduler request rid-i (n > 1).

        Records metrics; closing the iterator (client gone) aborts every choice.
        """
        info = await self.model_info()
        eos_ids = list(info.eos_token_ids)
        ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
        streams = [generate(self.client, self.tokenizer, rid, prompt_ids, params.for_choice(i),
                            eos_ids, index=i) for i, rid in enumerate(ids)]
        m = self.metrics
        m.requests.inc(endpoint=endpoint)
        m.prompt_tokens.inc(len(prompt_ids))
        m.in_flight += 1
        start, first = time.monotonic(), True
        try:
            async with contextlib.aclosing(merge(streams)) as deltas:
                async for delta in deltas:
                    if first and delta.token_ids:
                        m.ttft.observe(time.monotonic() - start)
                        first = False
                    m.generation_tokens.inc(len(delta.token_ids))
                    if delta.finish_reason is not None:
                        m.finished.inc(finish_reason=delta.finish_reason)
                    yield delta
            m.e2e.observe(time.monotonic() - start)
        except RouterError as e:
            m.failed.inc(code=str(e.status))
            raise
        finally:
            m.in_flight -= 1


async def collect(deltas: AsyncIterator[Delta], n: int) -> list[Delta]:
    """Fold a stream into one Delta per choice (all text, all tokens, the finish reason)."""
    out = [Delta(i, "", [], None, 0, 0) for i in range(n)]
    async with contextlib.aclosing(deltas) as stream:
        async for d in stream:
            acc = out[d.index]
            acc.text += d.text
            acc.token_ids += d.token_ids
            acc.finish_reason = d.finish_reason
            acc.prompt_tokens, acc.completion_tokens = d.prompt_tokens, d.completion_tokens
            acc.cached_tokens = d.cached_tokens
    return out

