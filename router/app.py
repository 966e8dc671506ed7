"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, tokenize, health, metrics.

Every generation runs through RouterCore.stream. A client that goes away, streaming or not, closes
that stream, which cancels the scheduler calls and so aborts the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.core import RouterCore, collect, random_id
from router.errors import RouterError, invalid_request
from router.generation import Delta, GenerationParams
from router.openai_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    Usage,
)
from router.tokenizer import ChatTemplateError

log = logging.getLogger("pagedserve.router")
T = TypeVar("T")
_REQUEST_ID_OK = re.compile(r"^[\w.:@/-]{1,128}$")


def create_app(core: RouterCore) -> FastAPI:
    """The router's FastAPI app around one RouterCore (tokenizer, scheduler client, metrics)."""
    app = FastAPI(title="pagedserve router", docs_url=None, redoc_url=None)
    app.state.core = core
    app.add_middleware(RequestIdMiddleware)
    _add_error_handlers(app)
    _add_info_routes(app, core)
    _add_generation_routes(app, core)
    return app


# -- request ids and errors -------------------------------------------------------------------
class RequestIdMiddleware:
    """Every response carries X-Request-Id: the client's own, else the response's id."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        state = scope.setdefault("state", {})
        state["request_id"] = given if _REQUEST_ID_OK.match(given) else None

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                rid = state.get("request_id") or random_id()
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _response_id(request: Request, prefix: str) -> str:
    rid = f"{prefix}-{random_id()}"
    if not request.scope["state"].get("request_id"):
        request.scope["state"]["request_id"] = rid
    return rid


def _error_response(e: RouterError) -> JSONResponse:
    return JSONResponse(e.to_dict(), status_code=e.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def router_error(request: Request, e: RouterError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
                 f"{err.get('msg', 'invalid')}" for err in errors]
        return _error_response(invalid_request("; ".join(parts) or "invalid request",
                                               loc[0] if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(RouterError(str(e.detail), e.status_code, kind))


# -- models, tokenizer, health, metrics -------------------------------------------------------
def _add_info_routes(app: FastAPI, core: RouterCore) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict:
        try:
            max_len = await core.max_model_len()
        except RouterError:
            max_len = None
        card = ModelCard(id=core.model_name, created=core.created, root=str(core.model_dir),
                         max_model_len=max_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = await core.stats()
        if stats is None:
            return JSONResponse({"status": "scheduler unreachable"}, status_code=503)
        if not stats.executor_connected:
            return JSONResponse({"status": "executor not connected"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = core.metrics.render(await core.stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        core.check_model(body.model)
        if body.messages is not None:  # the template writes BOS itself: none added by default
            text = _render_chat(core, [m.template_dict() for m in body.messages],
                                body.add_generation_prompt, body.chat_template_kwargs or {})
            ids = core.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            ids = core.tokenizer.encode(body.prompt or "", add_special_tokens=add)
        return {"count": len(ids), "max_model_len": await core.max_model_len(), "tokens": ids,
                "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        core.check_model(body.model)
        core.check_token_ids(body.tokens, "tokens")
        return {"prompt": core.tokenizer.decode(body.tokens, skip_special_tokens=False)}


def _render_chat(core: RouterCore, messages: list[dict], add_generation_prompt: bool,
                 kwargs: dict) -> str:
    try:
        return core.tokenizer.render_chat(messages, add_generation_prompt, **kwargs)
    except ChatTemplateError as e:
        raise invalid_request(str(e), "messages") from e


# -- completions and chat ---------------------------------------------------------------------
def _add_generation_routes(app: FastAPI, core: RouterCore) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        core.check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = core.tokenizer.encode(body.prompt, add_special_tokens=True)
        else:
            if not body.prompt:
                raise invalid_request("prompt must not be empty", "prompt")
            prompt_ids = list(body.prompt)
            core.check_token_ids(prompt_ids, "prompt")
        params = await _params(core, body, prompt_ids, "prompt")
        gen = _Generation(core, body, _response_id(request, "cmpl"), prompt_ids, params)
        if body.stream:
            await gen.open(request)
            return _SSEResponse(gen.completion_events(), media_type="text/event-stream")
        return JSONResponse(await _unless_disconnected(request, gen.completion()))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        core.check_model(body.model)
        kwargs = dict(body.chat_template_kwargs or {})
        if body.tools:
            kwargs["tools"] = body.tools
        text = _render_chat(core, body.template_messages(), body.add_generation_prompt, kwargs)
        prompt_ids = core.tokenizer.encode(text, add_special_tokens=False)
        params = await _params(core, body, prompt_ids, "messages")
        gen = _Generation(core, body, _response_id(request, "chatcmpl"), prompt_ids, params)
        if body.stream:
            await gen.open(request)
            return _SSEResponse(gen.chat_events(), media_type="text/event-stream")
        return JSONResponse(await _unless_disconnected(request, gen.chat()))


async def _params(core: RouterCore, body: SamplingRequest, prompt_ids: list[int],
                  param: str) -> GenerationParams:
    max_tokens = await core.resolve_max_tokens(len(prompt_ids), body.requested_max_tokens(),
                                               param)
    params = body.params(max_tokens)
    core.check_token_ids(list(params.logit_bias), "logit_bias")
    core.check_token_ids(list(params.stop_token_ids), "stop_token_ids")
    return params


class _Generation:
    """One API request's generation, shaped as completion or chat, streamed or whole."""

    def __init__(self, core: RouterCore, body: SamplingRequest, response_id: str,
                 prompt_ids: list[int], params: GenerationParams) -> None:
        self.core, self.body, self.id = core, body, response_id
        self.prompt_ids, self.params = prompt_ids, params
        self.model = body.model or core.model_name
        self.created = _now()
        self.endpoint = "chat" if isinstance(body, ChatCompletionRequest) else "completions"

    def _deltas(self) -> AsyncIterator[Delta]:
        return self.core.stream(self.id, self.prompt_ids, self.params, self.body.n, self.endpoint)

    async def open(self, request: Request) -> None:
        """Start streaming and wait for the first delta, so that an error before any output
        (scheduler down, request refused) still gets its HTTP status instead of an SSE event."""
        self._stream = self._deltas()
        try:
            self._first = await _unless_disconnected(request, anext(self._stream))
        except BaseException:
            await self._stream.aclose()
            raise

    async def _opened(self) -> AsyncIterator[Delta]:
        async with contextlib.aclosing(self._stream) as stream:
            yield self._first
            async for delta in stream:
                yield delta

    def _usage(self, completion_tokens: int) -> Usage:
        return Usage.of(len(self.prompt_ids), completion_tokens)

    async def completion(self) -> dict:
        choices = await collect(self._deltas(), self.body.n)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason)
                     for c in choices],
            usage=self._usage(sum(c.completion_tokens for c in choices)),
        ).model_dump()

    async def chat(self) -> dict:
        choices = await collect(self._deltas(), self.body.n)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                                finish_reason=c.finish_reason) for c in choices],
            usage=self._usage(sum(c.completion_tokens for c in choices)),
        ).model_dump()

    async def completion_events(self) -> AsyncIterator[str]:
        def chunk(choices: list, usage: Usage | None) -> CompletionResponse:
            return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=choices, usage=usage)

        async for event in self._events(
                lambda d: [CompletionChoice(index=d.index, text=d.text,
                                            finish_reason=d.finish_reason)], chunk, []):
            yield event

    async def chat_events(self) -> AsyncIterator[str]:
        def chunk(choices: list, usage: Usage | None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                       choices=choices, usage=usage)

        first = [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                 for i in range(self.body.n)]
        async for event in self._events(
                lambda d: [ChatStreamChoice(index=d.index,
                                            delta=DeltaMessage(content=d.text or None),
                                            finish_reason=d.finish_reason)], chunk, first):
            yield event

    async def _events(self, choices_of: Any, chunk: Any, first: list) -> AsyncIterator[str]:
        """SSE events: the first choices, one chunk per non-empty delta, usage, [DONE]."""
        opts = self.body.stream_options
        usage_on = bool(opts and opts.include_usage)
        every = bool(usage_on and opts and opts.continuous_usage_stats)
        done = [0] * self.body.n
        try:
            for choice in first:
                yield _sse(chunk([choice], self._usage(0) if every else None), usage_on)
            async with contextlib.aclosing(self._opened()) as deltas:
                async for d in deltas:
                    done[d.index] = d.completion_tokens
                    if d.text or d.finish_reason is not None:
                        usage = self._usage(sum(done)) if every else None
                        yield _sse(chunk(choices_of(d), usage), usage_on)
            if usage_on:
                yield _sse(chunk([], self._usage(sum(done))), True)
        except RouterError as e:
            yield f"data: {json.dumps(e.to_dict())}\n\n"
        yield "data: [DONE]\n\n"


def _sse(chunk: Any, with_usage: bool) -> str:
    data = chunk.model_dump(exclude=None if with_usage else {"usage"})
    for choice in data["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _now() -> int:
    return int(time.time())


# -- client disconnects -----------------------------------------------------------------------
async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it (and so the scheduler calls) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        log.info("client disconnected; request cancelled")
        raise RouterError("client disconnected", 499, "client_closed_request")
    return task.result()


class _SSEResponse(StreamingResponse):
    """Server-sent events that stop the generation as soon as the client goes away."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        streamer = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (streamer, watcher):
                t.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        if not streamer.cancelled() and isinstance(streamer.exception(), Exception) \
                and not isinstance(streamer.exception(), OSError):
            raise streamer.exception()  # type: ignore[misc]
