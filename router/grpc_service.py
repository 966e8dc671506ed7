"""The public gRPC API: the Generation service (protos/generation.proto), grpc.health.v1 and,
behind a flag, server reflection.

Sampling fields are validated by the same pydantic model as the HTTP API, so both fronts accept
and refuse the same values. With an API key set, every method but grpc.health.v1's wants the
metadata `authorization: Bearer KEY` (else UNAUTHENTICATED).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError

from pagedserve.protos import generation_pb2, generation_pb2_grpc, grpc_options, tls
from pagedserve.protos.parse_guard import AioParseGuard
from pagedserve.router.core import RouterCore, random_id
from pagedserve.router.errors import RouterError, context_length_exceeded, invalid_request
from pagedserve.router.generation import ChoiceSpec, Delta, GenerationParams
from pagedserve.router.json_body import validation_error
from pagedserve.router.openai_protocol import SamplingRequest, check_list_sizes
from pagedserve.router.request_trace import client_traceparent
from pagedserve.router.structured_outputs import Constraint, from_structured_outputs

log = structlog.get_logger("pagedserve.router")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens")


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        rid = request.request_id or f"gen-{random_id()}"
        structlog.contextvars.bind_contextvars(request_id=rid)
        client_traceparent.set(dict(context.invocation_metadata() or ()).get("traceparent", ""))
        try:
            prompt_ids = await self._prompt_ids(request)
            params = await self._params(request, len(prompt_ids))
            deltas = self.core.stream(rid, [ChoiceSpec(0, prompt_ids, params)], "grpc")
            async with contextlib.aclosing(deltas) as stream:
                async for d in stream:
                    if d.text or d.token_ids or d.finish_reason:
                        yield _response(rid, d)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)
        except (asyncio.CancelledError, GeneratorExit):  # cancelled, or past its deadline
            self.core.metrics.aborted.labels(reason="cancelled").inc()
            raise

    def _check_sizes(self, request: generation_pb2.GenerateRequest) -> None:
        """The request's lists against the limits, before anything is built from them."""
        sizes = {"stop": len(request.stop), "stop_token_ids": len(request.stop_token_ids)}
        if request.WhichOneof("input") == "chat":
            sizes["messages"] = len(request.chat.messages)
        check_list_sizes(sizes, self.core.limits)

    async def _prompt_ids(self, request: generation_pb2.GenerateRequest) -> list[int]:
        self.core.check_model(request.model)
        self._check_sizes(request)
        kind = request.WhichOneof("input")
        if kind == "prompt":
            ids = await self.core.encode(request.prompt, True, "prompt")
            if not ids:
                raise invalid_request("prompt must not be empty", "prompt")
            return ids
        if kind == "prompt_token_ids":
            given = request.prompt_token_ids.ids
            if not given:
                raise invalid_request("prompt_token_ids must not be empty", "prompt_token_ids")
            max_len = await self.core.max_model_len()
            if len(given) >= max_len:  # no room for one token: refused before copying them
                raise context_length_exceeded(max_len, len(given), None, "prompt_token_ids")
            ids = list(given)
            self.core.check_token_ids(ids, "prompt_token_ids")
            return ids
        if kind == "chat":
            chat = request.chat
            add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
            messages = [{"role": m.role, "content": m.content} for m in chat.messages]
            if not messages:
                raise invalid_request("chat.messages must not be empty", "chat")
            return await self.core.chat_prompt_ids(messages, add, param="chat")
        raise invalid_request("give one of prompt, prompt_token_ids or chat", "input")

    async def _params(self, request: generation_pb2.GenerateRequest,
                      prompt_len: int) -> GenerationParams:
        limits = self.core.limits
        logprobs = request.logprobs if request.HasField("logprobs") else None
        if logprobs is not None and not 0 <= logprobs <= limits.max_logprobs:
            raise invalid_request(f"logprobs must be in [0, {limits.max_logprobs}]", "logprobs")
        fields = {f: getattr(request, f) for f in _OPTIONAL_FIELDS if request.HasField(f)}
        fields.update(stop=list(request.stop), stop_token_ids=list(request.stop_token_ids),
                      ignore_eos=request.ignore_eos)
        try:
            body = SamplingRequest.model_validate(fields)
        except ValidationError as e:
            raise validation_error(e) from e
        body.check(limits)
        max_tokens = await self.core.resolve_max_tokens(prompt_len, body.max_tokens)
        params = body.params(max_tokens)
        self.core.check_token_ids(list(params.stop_token_ids), "stop_token_ids")
        structured = await self.core.check_constraint(_constraint(request))
        return GenerationParams(**{**vars(params), "logprobs": logprobs,
                                   "structured": structured})

    async def Tokenize(self, request: generation_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.TokenizeResponse:
        try:
            self.core.check_model(request.model)
            ids = await self.core.encode(request.text, request.add_special_tokens, "text", False)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)
        return generation_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: generation_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> generation_pb2.DetokenizeResponse:
        try:
            self.core.check_model(request.model)
            self.core.check_token_ids(list(request.token_ids), "token_ids")
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)
        text = await self.core.off_loop(self.core.tokenizer.decode, list(request.token_ids),
                                        request.skip_special_tokens)
        return generation_pb2.DetokenizeResponse(text=text)

    async def ListModels(self, request: generation_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> generation_pb2.ListModelsResponse:
        try:
            max_len = await self.core.max_model_len()
        except RouterError:
            max_len = 0
        card = generation_pb2.ModelCard(id=self.core.model_name, max_model_len=max_len,
                                        owned_by="pagedserve")
        return generation_pb2.ListModelsResponse(models=[card])


def _constraint(request: generation_pb2.GenerateRequest) -> Constraint | None:
    """The request's StructuredOutputs as a constraint (the same as HTTP's structured_outputs),
    refused with min_tokens or ignore_eos as there."""
    if not request.HasField("structured_outputs"):
        return None
    so = request.structured_outputs
    kind = so.WhichOneof("kind")
    if kind is None:
        raise invalid_request("structured_outputs sets no constraint", "structured_outputs")
    value = list(so.choice.choices) if kind == "choice" else getattr(so, kind)
    c = from_structured_outputs({kind: value})
    for field in ("min_tokens", "ignore_eos"):
        if c is not None and getattr(request, field):
            raise invalid_request(f"{field} cannot be combined with structured_outputs", field)
    return c


def _response(request_id: str, d: Delta) -> generation_pb2.GenerateResponse:
    out = generation_pb2.GenerateResponse(request_id=request_id, text=d.text,
                                          token_ids=d.token_ids)
    if d.logprobs is not None:
        for token_id, logprob, top in zip(d.token_ids, d.logprobs, d.top_logprobs or ()):
            out.logprobs.add(token_id=token_id, logprob=logprob,
                             top_token_ids=[t for t, _ in top], top_logprobs=[lp for _, lp in top])
    if d.finish_reason is not None:
        out.finish_reason = d.finish_reason
        out.usage.CopyFrom(generation_pb2.Usage(
            prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
            total_tokens=d.prompt_tokens + d.completion_tokens, cached_tokens=d.cached_tokens))
    return out


class _ReadinessServicer(health.aio.HealthServicer):
    """grpc.health.v1 that asks the router's readiness afresh on each Check and Watch, as HTTP
    /health does; the answer reaches this servicer's statuses through the reporter's listener."""

    def __init__(self, core: RouterCore) -> None:
        super().__init__()
        self._core = core

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        await self._core.readiness()
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        await self._core.readiness()
        await super().Watch(request, context)


class HealthReporter:
    """grpc.health.v1 status of the Generation service: the router's one readiness
    (RouterCore.readiness, which HTTP /health answers from). Check and Watch ask it afresh;
    watchers hear every answer, whoever asked: HTTP /health, a Check, or this reporter, which
    asks every interval_s so that watchers hear of changes when nobody else asks."""

    def __init__(self, core: RouterCore, interval_s: float = 5.0) -> None:
        self.core, self.interval_s = core, interval_s
        self.servicer = _ReadinessServicer(core)
        core.readiness_listeners.append(self._set)
        self._task: asyncio.Task | None = None

    async def _set(self, ready: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)

    async def update(self) -> bool:
        return await self.core.readiness() is None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()
        with contextlib.suppress(ValueError):
            self.core.readiness_listeners.remove(self._set)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any method but health's without `authorization: Bearer KEY`."""

    def __init__(self, api_key: str) -> None:
        self.expected = f"Bearer {api_key}".encode()

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return True
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"),
                     "")
        given = given.encode() if isinstance(given, str) else bytes(given)
        return hmac.compare_digest(given, self.expected)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self._allowed(details):
            return handler

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or incorrect API key (metadata authorization: Bearer KEY)")

        kinds = ((handler.unary_unary, grpc.unary_unary_rpc_method_handler),
                 (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
                 (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
                 (handler.stream_stream, grpc.stream_stream_rpc_method_handler))
        make = next(make for fn, make in kinds if fn is not None)
        return make(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def create_grpc_server(core: RouterCore, address: str, enable_reflection: bool = False,
                       health_interval_s: float = 5.0) -> tuple[grpc.aio.Server, int,
                                                                HealthReporter]:
    """A grpc.aio server with Generation and health (and reflection when asked), bound to
    address ('host:port', port 0 picks one). Returns (server, bound port, health reporter);
    start both with `await server.start(); reporter.start()`."""
    interceptors = [ApiKeyInterceptor(core.api_key)] if core.api_key else []
    interceptors.append(AioParseGuard())  # inside the key check: no key, UNAUTHENTICATED first
    server = grpc.aio.server(interceptors=interceptors,
                             options=list(grpc_options.PUBLIC_SERVER.items()))
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationService(core), server)
    reporter = HealthReporter(core, health_interval_s)
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    if enable_reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = tls.add_port(server, address, client_auth=False)  # the public API: any client
    return server, port, reporter
