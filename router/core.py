"""What the HTTP and gRPC fronts share: tokenizer, scheduler client, model facts, metrics.

The router is stateless: everything here can be rebuilt from the model directory and the
scheduler's address. Model facts (max_model_len, EOS ids) come from the scheduler's ModelInfo,
fetched on first need and kept once it answered.

Tokenizing and chat rendering run in worker threads (`off_loop`), never on the event loop, and
only for texts that can fit the context: one big request must not stall /health and the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog

from pagedserve.protos import executor_pb2, scheduler_pb2
from pagedserve.router.errors import (
    RouterError,
    context_length_exceeded,
    from_grpc,
    invalid_request,
    model_not_found,
    too_many_requests,
)
from pagedserve.router.generation import ChoiceSpec, Delta, generate, merge
from pagedserve.router.grammar_check import GrammarChecker, make_tokenizer
from pagedserve.router.limits import Limits
from pagedserve.router.metrics import Metric, Metrics
from pagedserve.router.replicas import SchedulerReplicas, connect
from pagedserve.router.request_trace import RequestSpan
from pagedserve.router.scheduler_client import SchedulerClient
from pagedserve.router.structured_outputs import Constraint
from pagedserve.router.tokenizer import (
    MAX_RENDER_CHARS,
    ChatTemplateError,
    PromptTooLong,
    Tokenizer,
)

log = structlog.get_logger("pagedserve.router")
DEFAULT_RESUME_TIMEOUT_S = 30.0
T = TypeVar("T")


def random_id() -> str:
    return uuid.uuid4().hex


class RouterCore:
    """The router's shared state and settings.

    api_key: when set, every route but /health (and every public gRPC method) wants it as
    `Authorization: Bearer KEY`. trust_request_chat_template: whether a request may bring its own
    chat_template / chat_template_kwargs (they render in the sandbox either way).
    """

    def __init__(self, model_dir: str | Path, scheduler_addr: str,
                 served_model_name: str | None = None, tokenizer: Tokenizer | None = None,
                 client: SchedulerClient | None = None, *, limits: Limits | None = None,
                 api_key: str | None = None, trust_request_chat_template: bool = False,
                 tool_call_parser: str | None = None,
                 reasoning_parser: str | None = None, replica_policy: str = "prefix",
                 metrics_public: bool = False,
                 scheduler_resume_timeout_s: float = DEFAULT_RESUME_TIMEOUT_S) -> None:
        self.limits = limits or Limits()
        # how chat output is split into reasoning, content and tool calls (router/tool_parsers.py,
        # router/reasoning.py); None: no parsing
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self.api_key = api_key or None
        self.metrics_public = metrics_public  # /metrics without the API key
        # how long a request waits for its scheduler to come back (router/resume.py); 0: not
        self.scheduler_resume_timeout_s = scheduler_resume_timeout_s
        self.trust_request_chat_template = trust_request_chat_template
        self.model_dir = Path(model_dir)
        self.model_name = served_model_name or str(model_dir)
        self.tokenizer = tokenizer or Tokenizer.from_dir(self.model_dir)
        # one scheduler, or several replicas chosen per request (router/replicas.py)
        self.client = client or connect(scheduler_addr, replica_policy)
        self.metrics = Metrics()
        self.created = int(time.time())
        self._info: executor_pb2.DescribeResponse | None = None
        # told each readiness answer (gRPC health follows what HTTP /health says)
        self.readiness_listeners: list[Callable[[bool], Awaitable[None]]] = []
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                        thread_name_prefix="router-tokenize")
        self._grammars: GrammarChecker | None = None  # built at the first constrained request

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

    @property
    def known_max_model_len(self) -> int | None:
        """max_model_len if the scheduler has told it already (no waiting)."""
        return self._info.max_model_len if self._info is not None else None

    def check_model(self, model: str | None) -> None:
        """An empty model means the served one; any other name must match it."""
        if model and model not in (self.model_name, str(self.model_dir)):
            raise model_not_found(model)

    def replica_metric_families(self) -> list[Metric]:
        return (self.client.metric_families() if isinstance(self.client, SchedulerReplicas)
                else [])

    async def stats(self) -> scheduler_pb2.StatsResponse | None:
        try:
            return await self.client.stats()
        except grpc.aio.AioRpcError:
            return None

    async def readiness(self) -> str | None:
        """None when the router can serve (its scheduler answers and has an executor), else why
        not: the one source of HTTP /health and gRPC health, asked afresh each time."""
        stats = await self.stats()
        reason = ("scheduler unreachable" if stats is None
                  else None if stats.executor_connected else "executor not connected")
        for listener in self.readiness_listeners:
            await listener(reason is None)
        return reason

    # -- requests ---------------------------------------------------------------------------
    async def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None,
                                 param: str = "prompt") -> int:
        """max_tokens as asked, or all the room the context leaves; 400 when it does not fit."""
        max_len = await self.max_model_len()
        room = max_len - prompt_len
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise context_length_exceeded(max_len, prompt_len, max_tokens, param)
        cap = self.limits.max_output_tokens
        if cap is not None and max_tokens is not None and max_tokens > cap:
            raise invalid_request(f"max_tokens must be at most {cap}", "max_tokens")
        if max_tokens is None:
            return room if cap is None else min(room, cap)
        return max_tokens

    @property
    def vocab_size(self) -> int:
        """Token ids are below this: the model's once the scheduler said, else the tokenizer's."""
        return (self._info.vocab_size if self._info else 0) or self.tokenizer.vocab_size

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):  # builtins: no Python loop
            raise invalid_request(f"token ids must be in [0, {vocab})", param)

    async def check_constraint(self, constraint: Constraint | None) -> str | None:
        """The constraint's grammar once it compiled for this model (400 naming its field when
        it does not, in time); None for no constraint."""
        if constraint is None:
            return None
        if self._grammars is None:  # tokenizer.json's text; for a GGUF file the tokenizer
            # router/gguf_tokenizer.py built from its metadata (the executor reads its vocabulary)
            info = await self.model_info()
            tokenizer = await self.off_loop(make_tokenizer, self.tokenizer.hf.to_str(),
                                            self.vocab_size, list(info.eos_token_ids))
            self._grammars = GrammarChecker(tokenizer)
        await self.off_loop(self._grammars.check, constraint)
        return constraint.grammar

    # -- tokenizing and chat templates, off the event loop ------------------------------------
    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) in the router's worker threads: tokenizing releases the GIL, and
        a request's template renders in a worker process, so the loop serves others meanwhile."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def prompt_chars_limit(self) -> int | None:
        """The longest text worth tokenizing: --max-prompt-chars, else the most characters that
        max_model_len tokens can stand for (None: the tokenizer bounds nothing)."""
        if self.limits.max_prompt_chars is not None:
            return self.limits.max_prompt_chars
        per_token = self.tokenizer.max_chars_per_token
        return None if per_token is None else per_token * await self.max_model_len()

    async def check_prompt_chars(self, text: str, param: str) -> None:
        """400 naming param for a text past prompt_chars_limit, before any tokenizing."""
        per_token = self.tokenizer.max_chars_per_token
        if self.limits.max_prompt_chars is None and per_token and len(text) <= per_token:
            return  # one token's worth fits any context: no need to ask the scheduler
        limit = await self.prompt_chars_limit()
        if limit is None or len(text) <= limit:
            return
        if self.limits.max_prompt_chars is not None:
            raise invalid_request(f"{param} is {len(text)} characters long; at most {limit} are "
                                  "accepted (--max-prompt-chars)", param)
        raise invalid_request(
            f"{param} is {len(text)} characters long: more than this model's maximum context "
            f"length of {await self.max_model_len()} tokens can hold (a token stands for at "
            f"most {per_token} characters)", param, "context_length_exceeded")

    async def encode(self, text: str, add_special_tokens: bool, param: str,
                     prompt: bool = True) -> list[int]:
        """Token ids of text, refused (400 naming param) when it is too long to tokenize, or,
        for a prompt, when it leaves the context no room for a token."""
        await self.check_prompt_chars(text, param)
        max_len = await self.max_model_len() if prompt else None
        try:
            return await self.off_loop(self.tokenizer.encode, text, add_special_tokens,
                                       None if max_len is None else max_len - 1)
        except PromptTooLong as e:
            raise context_length_exceeded(max_len or 0, e.count, None, param) from None

    async def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, template: str | None = None,
                          template_kwargs: dict[str, Any] | None = None,
                          param: str = "messages", tools: list[dict] | None = None) -> str:
        """The chat's prompt text; a template's refusal or failure is a 400 naming
        chat_template when the request brought the template, else param. tools: the
        template's `tools` variable (Hugging Face's convention)."""
        if tools:
            template_kwargs = {**(template_kwargs or {}), "tools": tools}
        max_chars = await self.prompt_chars_limit() if template else None
        try:
            text = await self.off_loop(
                self.tokenizer.render_chat, messages, add_generation_prompt,
                continue_final_message, template, template_kwargs, max_chars or MAX_RENDER_CHARS)
        except ChatTemplateError as e:
            raise invalid_request(str(e), "chat_template" if template else param) from e
        await self.check_prompt_chars(text, param)
        return text

    async def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                              continue_final_message: bool = False, template: str | None = None,
                              template_kwargs: dict[str, Any] | None = None,
                              param: str = "messages",
                              tools: list[dict] | None = None) -> list[int]:
        """The chat's prompt token ids (the template writes its own BOS); 400 naming what the
        client sent (chat_template or param) when the template renders no tokens."""
        text = await self.render_chat(messages, add_generation_prompt, continue_final_message,
                                      template, template_kwargs, param, tools)
        ids = await self.encode(text, False, param)
        if not ids:
            raise invalid_request("the chat template rendered an empty prompt",
                                  "chat_template" if template else param)
        return ids

    @property
    def waiting(self) -> int:
        """Requests admitted to the router that have not had their first token yet."""
        return self.metrics.waiting

    def _admit(self) -> None:
        if self.metrics.waiting >= self.limits.max_queued_requests:
            self.metrics.failed.labels(code="429").inc()
            raise too_many_requests(self.metrics.waiting)

    async def stream(self, request_id: str, specs: list[ChoiceSpec],
                     endpoint: str = "") -> AsyncIterator[Delta]:
        """Deltas of every choice interleaved; choice k runs as scheduler request id-k (when
        there are several). Admission (429 past max_queued_requests) happens at the first
        anext(); closing the iterator (client gone) aborts every choice."""
        self._admit()
        m, start, generated = self.metrics, time.monotonic(), 0
        m.waiting += 1
        waiting, error = True, "cancelled"
        span = RequestSpan(request_id, endpoint, len(specs))
        try:
            info = await self.model_info()
            eos_ids = list(info.eos_token_ids)
            ids = [request_id] if len(specs) == 1 else [f"{request_id}-{k}"
                                                        for k in range(len(specs))]
            streams = [generate(self.client, self.tokenizer, rid, s.prompt_ids, s.params,
                                eos_ids, index=s.index,
                                resume_timeout_s=self.scheduler_resume_timeout_s,
                                traceparent=span.traceparent)
                       for rid, s in zip(ids, specs)]
            m.requests.labels(endpoint=endpoint).inc()
            m.prompt_tokens.inc(sum(len(s.prompt_ids) for s in specs))
            m.in_flight += 1
            timing = _TokenTiming(m, len(specs))
            try:
                async with contextlib.aclosing(merge(streams)) as deltas:
                    async for delta in deltas:
                        if waiting:
                            m.waiting, waiting = m.waiting - 1, False
                            m.ttft.observe(time.monotonic() - start, span.exemplar)
                        timing.saw(delta)
                        generated += len(delta.token_ids)
                        m.generation_tokens.inc(len(delta.token_ids))
                        if delta.finish_reason is not None:
                            m.finished.labels(finish_reason=delta.finish_reason).inc()
                        yield delta
                m.e2e.observe(time.monotonic() - start, span.exemplar)
                error = ""
                log.info("request finished", endpoint=endpoint, sequences=len(specs),
                         completion_tokens=generated, seconds=round(time.monotonic() - start, 4))
            finally:
                m.in_flight -= 1
        except RouterError as e:
            m.failed.labels(code=str(e.status)).inc()
            log.info("request failed", status=e.status, error=e.message)
            error = f"{e.status}: {e.message}"
            raise
        finally:
            if waiting:
                m.waiting -= 1
            span.end(prompt_tokens=sum(len(s.prompt_ids) for s in specs),
                     completion_tokens=generated, error=error)


class _TokenTiming:
    """Each sequence's inter-token gaps and, once it finishes, its time per output token."""

    def __init__(self, metrics: Metrics, num_sequences: int) -> None:
        self.metrics = metrics
        self.first: list[float | None] = [None] * num_sequences
        self.last: list[float] = [0.0] * num_sequences
        self.count = [0] * num_sequences

    def saw(self, delta: Delta) -> None:
        now, i, k = time.monotonic(), delta.index, len(delta.token_ids)
        if k and self.first[i] is None:
            self.first[i] = now
        elif k:
            gap = (now - self.last[i]) / k
            for _ in range(k):  # one observation per token (the library has no weights)
                self.metrics.itl.observe(gap)
        if k:
            self.last[i], self.count[i] = now, self.count[i] + k
        first = self.first[i]
        if delta.finish_reason is not None and first is not None and self.count[i] > 1:
            self.metrics.tpot.observe((self.last[i] - first) / (self.count[i] - 1))


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
            if d.logprobs is not None:
                acc.logprobs = (acc.logprobs or []) + d.logprobs
                acc.top_logprobs = (acc.top_logprobs or []) + (d.top_logprobs or [])
    return out

