"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, tokenize, health, metrics.

Bodies are read by router.json_body (size, strict JSON, depth, int64, then pydantic), so every
refusal is a 400 (413 for size) in OpenAI's shape, never FastAPI's 422. Every generation runs
through RouterCore.stream. A client that goes away, streaming or not, closes that stream, which
cancels the scheduler calls and so aborts the requests.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, TypeVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve.router.core import RouterCore, random_id
from pagedserve.router.dashboard import add_dashboard_routes
from pagedserve.router.errors import RouterError, invalid_request
from pagedserve.router.generation import GenerationParams
from pagedserve.router.http_middleware import ApiKeyMiddleware, RequestIdMiddleware, bind_request_id
from pagedserve.router.json_body import read_model
from pagedserve.router.metrics import OPENMETRICS_TYPE
from pagedserve.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    array_bounds,
    check_body_sizes,
)
from pagedserve.router.openapi import describe
from pagedserve.router.reasoning import answer_constraint
from pagedserve.router.responses import ResponsesGeneration
from pagedserve.router.responses_protocol import ResponsesRequest, renamed
from pagedserve.router.serving import ChatGeneration, CompletionGeneration, Generation, Prompt
from pagedserve.router.structured_outputs import Constraint

log = structlog.get_logger("pagedserve.router")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
    "/v1/responses": ResponsesRequest,
}


def create_app(core: RouterCore) -> FastAPI:
    """The router's FastAPI app around one RouterCore (tokenizer, scheduler client, metrics)."""
    app = FastAPI(title="pagedserve router", docs_url=None, redoc_url=None)
    app.state.core = core
    if core.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=core.api_key,
                           metrics_public=core.metrics_public)
    app.add_middleware(RequestIdMiddleware)
    _add_error_handlers(app)
    _add_info_routes(app, core)
    add_dashboard_routes(app, core)
    _add_generation_routes(app, core)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict:
    """The description (router/openapi.py), rebuilt when what it states changes: the vocabulary
    size (the tokenizer's until the scheduler gives the model's) or the limits."""
    key = (app.state.core.vocab_size, app.state.core.limits)
    if app.openapi_schema is None or getattr(app.state, "openapi_key", None) != key:
        app.openapi_schema, app.state.openapi_key = describe(app, BODIES), key
    return app.openapi_schema


async def _body(core: RouterCore, request: Request, model: type[M]) -> M:
    limits = core.limits
    sizes = functools.partial(check_body_sizes, limits=limits,
                              max_model_len=core.known_max_model_len)
    return await read_model(request, model, limits.max_request_body_bytes, limits.max_json_depth,
                            sizes, array_bounds(limits))


def _response_id(request: Request, prefix: str) -> str:
    rid = f"{prefix}-{random_id()}"
    if not request.scope["state"].get("client_request_id"):
        bind_request_id(request.scope, rid)
    return rid


def _error_response(e: RouterError) -> JSONResponse:
    return JSONResponse(e.to_dict(), status_code=e.status, headers=e.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def router_error(request: Request, e: RouterError) -> JSONResponse:
        if e.status >= 500:
            log.warning("request failed", status=e.status, error=e.message)
        return _error_response(e)

    @app.exception_handler(RequestValidationError)  # no route declares params today; if one
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()  # ever does, its refusals are 400s too, never 422s
        loc = [str(p) for p in (errors[0].get("loc", ()) if errors else ()) if p != "body"]
        return _error_response(invalid_request(str(errors[0].get("msg", "invalid request"))
                                               if errors else "invalid request",
                                               loc[-1] if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        # e.headers carries what the status needs, such as a 405's Allow (RFC 9110)
        return _error_response(RouterError(str(e.detail), e.status_code, kind,
                                           headers=dict(e.headers or {})))


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
        reason = await core.readiness()  # gRPC health hears the same answer
        if reason is not None:
            return JSONResponse({"status": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        # Prometheus asks for OpenMetrics when it wants exemplars; plain text otherwise.
        openmetrics = "application/openmetrics-text" in request.headers.get("accept", "")
        text = core.metrics.render(await core.stats(), core.replica_metric_families(),
                                   openmetrics)
        return PlainTextResponse(text, media_type=OPENMETRICS_TYPE if openmetrics
                                 else "text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await _body(core, request, TokenizeRequest)
        core.check_model(body.model)
        if body.messages is not None:  # the template writes BOS itself: none added by default
            text = await _render_chat(core, [m.template_dict() for m in body.messages], body)
            ids = await core.encode(text, bool(body.add_special_tokens), "messages", False)
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await core.encode(body.prompt or "", add, "prompt", False)
        return {"count": len(ids), "max_model_len": await core.max_model_len(), "tokens": ids,
                "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await _body(core, request, DetokenizeRequest)
        core.check_model(body.model)
        await core.model_info()
        core.check_token_ids(body.tokens, "tokens")
        text = await core.off_loop(core.tokenizer.decode, body.tokens, skip_special_tokens=False)
        return {"prompt": text}


def _template_args(core: RouterCore, body: Any) -> tuple:
    """A chat (or /tokenize) body's template arguments, after its template fields are checked."""
    body.check_template(core.trust_request_chat_template)
    return (body.add_generation_prompt, body.continue_final_message, body.chat_template,
            body.chat_template_kwargs)


async def _render_chat(core: RouterCore, messages: list[dict], body: Any) -> str:
    return await core.render_chat(messages, *_template_args(core, body))


# -- completions and chat ---------------------------------------------------------------------
def _add_generation_routes(app: FastAPI, core: RouterCore) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _body(core, request, CompletionRequest)
        core.check_model(body.model)
        body.check(core.limits)
        await core.model_info()
        prompts = await _completion_prompts(core, body)
        internal = 0 if body.candidates > body.n and body.logprobs is None else None
        params = [await _params(core, body, p.ids, "prompt", internal) for p in prompts]
        gen = CompletionGeneration(core, body, _response_id(request, "cmpl"), prompts, params)
        return await _respond(gen, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _body(core, request, ChatCompletionRequest)
        core.check_model(body.model)
        body.check(core.limits)
        return await _respond(await _chat(core, body, _response_id(request, "chatcmpl")),
                              request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        body = await _body(core, request, ResponsesRequest)
        try:
            chat = body.to_chat()
            core.check_model(chat.model)
            chat.check(core.limits)
            gen = await _chat(core, chat, _response_id(request, "resp"))
        except RouterError as e:
            raise renamed(e) from None
        return await _respond(ResponsesGeneration(gen, body), request)


async def _chat(core: RouterCore, body: ChatCompletionRequest, response_id: str
                ) -> ChatGeneration:
    """A checked chat request's generation: tools planned, prompt rendered, params built."""
    await core.model_info()
    tools = body.tool_plan(core.tool_call_parser)
    prompt_ids = await core.chat_prompt_ids(body.template_messages(), *_template_args(core, body),
                                            tools=tools.template_tools)
    # a constraint holds for the answer, after any thinking (router/reasoning.py)
    constraint = answer_constraint(core.reasoning_parser, tools.constraint or body.constraint())
    params = await _params(core, body, prompt_ids, "messages", constraint=constraint)
    if tools.keep_special_tokens:  # the parser reads markers that are special tokens
        params = replace(params, skip_special_tokens=False)
    return ChatGeneration(core, body, response_id, Prompt(prompt_ids), params, tools)


async def _completion_prompts(core: RouterCore, body: CompletionRequest) -> list[Prompt]:
    out = []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            out.append(Prompt(await core.encode(prompt, True, "prompt"), prompt))
        else:
            core.check_token_ids(prompt, "prompt")
            out.append(Prompt(list(prompt), core.tokenizer.decode(
                prompt, skip_special_tokens=body.skip_special_tokens) if body.echo else ""))
    return out


async def _params(core: RouterCore, body: SamplingRequest, prompt_ids: list[int], param: str,
                  internal_logprobs: int | None = None,
                  constraint: Constraint | None = None) -> GenerationParams:
    """The generation params of one prompt; internal_logprobs: logprobs the router needs for
    itself (best_of ranking) when the client asked for none; constraint: one the router adds
    (tool_choice required or named), else the body's own."""
    max_tokens = await core.resolve_max_tokens(len(prompt_ids), body.requested_max_tokens(),
                                               param)
    params = body.params(max_tokens)
    core.check_token_ids(list(params.logit_bias), "logit_bias")
    core.check_token_ids(list(params.stop_token_ids), "stop_token_ids")
    constraint = constraint or body.constraint()
    for field in ("min_tokens", "ignore_eos"):  # EOS must stay allowed where the grammar ends
        if constraint is not None and getattr(body, field):
            raise invalid_request(f"{field} cannot be combined with a constraint on the output "
                                  f"({constraint.param})", field)
    params = replace(params, structured=await core.check_constraint(constraint))
    if params.logprobs is None and internal_logprobs is not None:
        params = replace(params, logprobs=internal_logprobs)
    return params


async def _respond(gen: Generation | ResponsesGeneration, request: Request) -> Response:
    if gen.body.stream:
        await _unless_disconnected(request, gen.open())
        return _SSEResponse(gen.events(), media_type="text/event-stream")
    return JSONResponse(await _unless_disconnected(request, gen.whole()))


# -- client disconnects -----------------------------------------------------------------------
async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(work: Awaitable[T], receive: Any) -> asyncio.Future[T]:
    """Runs work until it ends or the client goes away, whichever is first; returns work's task,
    cancelled in the second case (which cancels its scheduler calls too)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return task


def _count_disconnect(app: Any) -> None:
    app.state.core.metrics.aborted.labels(reason="client_disconnect").inc()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it if the client goes away first."""
    task = await _until_disconnect(work, request.receive)
    if task.cancelled():
        log.info("client disconnected; request cancelled")
        _count_disconnect(request.app)
        raise RouterError("client disconnected", 499, "client_closed_request")
    return task.result()


class _SSEResponse(StreamingResponse):
    """Server-sent events that stop the generation as soon as the client goes away."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            streamer = await _until_disconnect(self.stream_response(send), receive)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        error = None if streamer.cancelled() else streamer.exception()
        if streamer.cancelled() or isinstance(error, OSError):  # the client left mid-stream
            _count_disconnect(scope["app"])
        elif isinstance(error, Exception):
            raise error
