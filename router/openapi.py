"""/openapi.json: FastAPI's list of routes, completed by hand into an exact description.

FastAPI sees neither the request bodies (router.json_body reads them) nor what the routes answer,
so this adds: each request body's schema with the running server's limits (router.limits.Limits,
and token ids below the vocabulary size) as maximum / maxItems / maxLength / maxProperties; every
status each operation can answer, with OpenAI's error schema and the X-Request-Id and
Retry-After headers; the event stream that stream=true answers; /metrics' text format; and, with
an API key, the bearer scheme and its 401. /v1/responses streams named events (OpenAI's Responses
API: `event:` lines, no [DONE]) described in router/responses_schemas.py. tests/router/test_openapi.py
holds the server to it with Schemathesis.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from pagedserve.router.core import RouterCore
from pagedserve.router.limits import INT32_MAX, Limits
from pagedserve.router.openapi_schemas import MODELS
from pagedserve.router.responses_schemas import EVENT_NAMES
from pagedserve.router.responses_schemas import MODELS as RESPONSES_MODELS

JSON, SSE, PROMETHEUS = "application/json", "text/event-stream", "text/plain; version=0.0.4"
REF = "#/components/schemas/{model}"
BEARER = "bearerAuth"


def ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


@dataclass(frozen=True)
class Operation:
    ok: str  # the schema of a 200's JSON body
    errors: tuple[int, ...]  # the other statuses it can answer (401 comes with an API key)
    chunk: str | None = None  # with stream=true: the schema of each event's JSON
    named: bool = False  # events have `event:` names and no closing [DONE] (Responses API)


_GENERATION = (400, 404, 413, 429, 500, 502, 503)
OPERATIONS = {
    ("/v1/completions", "post"): Operation("CompletionResponse", _GENERATION, "CompletionChunk"),
    ("/v1/chat/completions", "post"): Operation("ChatCompletionResponse", _GENERATION,
                                                "ChatCompletionChunk"),
    ("/v1/responses", "post"): Operation("ResponseObject", _GENERATION, "ResponseStreamEvent",
                                         named=True),
    ("/tokenize", "post"): Operation("TokenizeResponse", (400, 404, 413, 500, 503)),
    ("/detokenize", "post"): Operation("DetokenizeResponse", (400, 404, 413, 500, 503)),
    ("/v1/models", "get"): Operation("ModelList", (500,)),
    ("/health", "get"): Operation("HealthStatus", (500, 503)),
    ("/metrics", "get"): Operation("", (500,)),
}
OPEN = {("/health", "get")}  # answers without the API key


def describe(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> dict:
    """The OpenAPI description of `app` (a router app: app.state.core is its RouterCore);
    bodies: the JSON body model of each POST path."""
    core = app.state.core
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description=_limits_text(core.limits))
    models = [(m, "validation") for m in bodies.values()] + \
        [(m, "serialization") for m in (*MODELS, *RESPONSES_MODELS)]
    _, defs = models_json_schema(models, ref_template=REF)
    schema.setdefault("components", {})["schemas"] = defs.get("$defs", {})
    for path, model in bodies.items():
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {JSON: {"schema": ref(model.__name__)}}}
    exact_requests(schema["components"]["schemas"], core)
    bound_requests(schema["components"]["schemas"], core.limits, core.vocab_size)
    for (path, method), op in OPERATIONS.items():
        secured = bool(core.api_key) and (path, method) not in OPEN
        entry = schema["paths"][path][method]
        entry["responses"] = _responses(op, core.limits, secured)
        if op.chunk:
            entry["description"] = RESPONSES_STREAM_TEXT if op.named else STREAM_TEXT
        if secured:
            entry["security"] = [{BEARER: []}]
    if core.api_key:
        schema["components"]["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer"}}
    return schema


def _limits_text(limits: Limits) -> str:
    """Every configured limit, so that one a schema keyword cannot state is still written."""
    rows = [f"- `{f.name}`: {_value(getattr(limits, f.name))} ({f.metadata.get('help', '')})"
            for f in fields(limits)]
    return "An OpenAI-compatible API. This server's limits (a request past one gets a 400 " \
           "naming the field; 413 for the body size, 429 for a full queue):\n\n" + "\n".join(rows)


def _value(limit: int | None) -> str:
    return "none" if limit is None else str(limit)


STREAM_TEXT = (
    "With `stream: true` the answer is `text/event-stream`: one `data: {chunk}` event per piece "
    "of output, then `data: [DONE]`. An error before the first event is an HTTP status as "
    "without streaming; one after it is a `data: {error}` event, then `data: [DONE]`.")
RESPONSES_STREAM_TEXT = (
    "OpenAI's Responses API over a chat turn (nothing is stored: `store: true` and "
    "`previous_response_id` are refused). With `stream: true` the answer is "
    "`text/event-stream`: `event: TYPE` and `data: {event}` per event, numbered by "
    "`sequence_number`: response.created, response.in_progress, then per output item "
    "output_item.added, its deltas, their .done events and output_item.done, and last "
    "response.completed (response.incomplete when cut by max_output_tokens). An error before the "
    "first event is an HTTP status as without streaming; one after it is an `error` event, "
    "which ends the stream.")


# -- responses ----------------------------------------------------------------------------------
_ERRORS = {
    400: "Invalid request: not JSON, or nested deeper than {limits.max_json_depth}; an integer "
         "past 64 bits anywhere in the body (unknown fields are ignored, yet checked so); a "
         "field of the wrong type (an integer is written 5, not 5.0), out of range or past one "
         "of this server's limits; fields that do not go together; or a prompt that does not "
         "fit the context. `error.param` names the field when there is one.",
    401: "Missing or incorrect API key (`Authorization: Bearer KEY`).",
    404: "No such model here: `model` must name the served model (or be left out).",
    413: "The body is larger than {limits.max_request_body_bytes} bytes.",
    429: "More than {limits.max_queued_requests} requests are waiting for their first token; "
         "retry after Retry-After seconds.",
    500: "Internal error, logged under the X-Request-Id.",
    502: "The scheduler sent an answer the router cannot use.",
    503: "The scheduler is unreachable; retry after Retry-After seconds.",
}
_REQUEST_ID = {"description": "The client's own X-Request-Id when it sent a sane one; else the "
                              "response's id (completions) or a new one. Logs carry it too.",
               "required": True, "schema": {"type": "string"}}
_RETRY_AFTER = {"description": "Seconds to wait before retrying.", "required": True,
                "schema": {"type": "integer", "minimum": 0}}


def _response(description: str, content: dict, retry: bool = False) -> dict:
    headers = {"X-Request-Id": _REQUEST_ID}
    if retry:
        headers["Retry-After"] = _RETRY_AFTER
    return {"description": description, "headers": headers, "content": content}


def _responses(op: Operation, limits: Limits, secured: bool) -> dict:
    if op.ok:
        ok = {JSON: {"schema": ref(op.ok)}}
    else:  # /metrics: Prometheus' text exposition format
        ok = {PROMETHEUS: {"schema": {"type": "string"}}}
    if op.chunk:
        ok[SSE] = {"schema": _named_event(op.chunk) if op.named else _event(op.chunk)}
    out = {"200": _response("OK" + (" (a stream with stream=true)" if op.chunk else ""), ok)}
    for status in sorted((*op.errors, *((401,) if secured else ()))):
        if op.ok == "HealthStatus" and status == 503:  # /health says why, in its own shape
            out["503"] = _response("Not ready: the scheduler is unreachable, or has no "
                                   "executor.", {JSON: {"schema": ref("HealthStatus")}})
            continue
        text = _ERRORS[status].format(limits=limits)
        out[str(status)] = _response(text, {JSON: {"schema": ref("ErrorResponse")}},
                                     status in (429, 503))
    return out


def _event(chunk: str) -> dict:
    """One server-sent event (OpenAPI before 3.2 describes a stream by its events): a chunk, an
    error once the stream has begun, or the closing [DONE]."""
    payload = {"anyOf": [ref(chunk), ref("ErrorResponse")]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": JSON, "contentSchema": payload}]}
    return {"type": "object", "properties": {"data": data}, "required": ["data"]}


def _named_event(payload: str) -> dict:
    """One named server-sent event: its type on the `event:` line, its JSON as data."""
    data = {"type": "string", "contentMediaType": JSON, "contentSchema": ref(payload)}
    return {"type": "object", "properties": {"event": {"enum": list(EVENT_NAMES)}, "data": data},
            "required": ["event", "data"]}


# -- request bodies -----------------------------------------------------------------------------
def exact_requests(defs: dict, core: RouterCore) -> None:
    """What this server refuses whatever the limits, where pydantic's types allow more: another
    model's name, a request's own chat template (unless trusted), content parts but text."""
    names = sorted({core.model_name, str(core.model_dir), ""})  # "": the served one
    for body in ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest",
                 "DetokenizeRequest", "ResponsesRequest"):
        defs[body]["properties"]["model"] = {
            "anyOf": [{"enum": names}, {"type": "null"}], "default": None,
            "description": "The served model; left out, null or empty: the same."}
    if not core.trust_request_chat_template:
        for body in ("ChatCompletionRequest", "TokenizeRequest"):
            for field in ("chat_template", "chat_template_kwargs"):
                defs[body]["properties"][field] = {
                    "type": "null", "description": "Refused: this server does not trust "
                                                   "request chat templates."}
    part = defs["ContentPart"]
    part["properties"].update(type={"const": "text", "type": "string"}, text={"type": "string"})
    part["required"] = ["type", "text"]
    defs["ResponsesRequest"]["properties"].update(_responses_fields(core.limits))


_STRING = {"type": "string"}


def _object(required: list[str], **properties: Any) -> dict:
    return {"type": "object", "properties": properties, "required": required}


def _responses_fields(limits: Limits) -> dict[str, dict]:
    """The Responses request's items, tools and formats, which its model takes as any objects
    (router/responses_protocol.py reads them by hand and refuses other kinds, naming the field)."""
    chars = {"type": "string", "maxLength": getattr(limits, "max_prompt_chars", None)}
    chars = {k: v for k, v in chars.items() if v is not None}
    part = _object(["type", "text"], type={"enum": ["input_text", "output_text"]}, text=chars)
    item = {"anyOf": [
        _object(["role", "content"], type={"const": "message"},
                role={"enum": ["system", "developer", "user", "assistant"]},
                content={"anyOf": [chars, {"type": "array", "items": part}]}),
        _object(["type", "call_id", "name", "arguments"], type={"const": "function_call"},
                call_id=_STRING, name=_STRING, arguments=_STRING),
        _object(["type", "call_id", "output"], type={"const": "function_call_output"},
                call_id=_STRING, output=_STRING)]}
    items = {"type": "array", "items": item, "minItems": 1}
    if getattr(limits, "max_messages", None) is not None:
        items["maxItems"] = limits.max_messages
    tool = _object(["type", "name"], type={"const": "function"},
                   name={"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"},
                   description=_STRING, parameters={"type": "object"},
                   strict={"type": ["boolean", "null"]})
    tools = {"type": "array", "items": tool}
    if getattr(limits, "max_tools", None) is not None:
        tools["maxItems"] = limits.max_tools
    named = _object(["type", "name"], type={"const": "function"}, name=_STRING)
    formats = [_object(["type"], type={"const": "text"}),
               _object(["type"], type={"const": "json_object"}),
               _object(["type", "schema"], type={"const": "json_schema"}, name=_STRING,
                       schema={"type": "object"}, description=_STRING,
                       strict={"type": ["boolean", "null"]})]
    return {
        "input": {"anyOf": [chars, items],
                  "description": "A user message, or a list of messages and function-call items."},
        "tools": {"anyOf": [tools, {"type": "null"}], "default": None},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, named,
                                  {"type": "null"}], "default": None},
        "text": {"anyOf": [_object([], format={"anyOf": formats}), {"type": "null"}],
                 "default": None},
    }


Bound = tuple[str, str, str, dict[str, Any]]  # (schema, property, branch kind, keywords)


def bound_requests(defs: dict, limits: Limits, vocab_size: int) -> None:
    """Write every limit a request schema can state into `defs`, on the branches of each
    property's type that it concerns (a kind: 'integer', 'string[]', 'ChatMessage[]', ...)."""
    token = {"minimum": 0, "maximum": vocab_size - 1}
    for name, prop, kind, keywords in (*_sampling_bounds(limits, token),
                                       *_prompt_bounds(limits, token)):
        branches = [b for b in _branches(defs[name]["properties"][prop]) if _kind(b) == kind]
        assert branches, f"{name}.{prop} has no {kind} branch"  # the models changed: update
        for branch in branches:
            _merge(branch, keywords)


def _sampling_bounds(limits: Limits, token: dict) -> list[Bound]:
    max_tokens = min(INT32_MAX, limits.max_output_tokens or INT32_MAX)
    stop = {"maxLength": limits.max_stop_length}
    rows: list[Bound] = []
    for body in ("CompletionRequest", "ChatCompletionRequest"):
        rows += [
            (body, "n", "integer", {"maximum": limits.max_n}),
            (body, "max_tokens", "integer", {"maximum": max_tokens}),
            (body, "stop", "string", stop),
            (body, "stop", "string[]", {"maxItems": limits.max_stop, "items": stop}),
            (body, "logit_bias", "object", {
                "maxProperties": limits.max_logit_bias,
                "propertyNames": {"pattern": "^[0-9]{1,10}$"},  # token ids, as text
                "additionalProperties": {"minimum": -100, "maximum": 100}}),
            (body, "stop_token_ids", "integer[]",
             {"maxItems": getattr(limits, "max_stop_token_ids", None), "items": token}),
        ]
    return [*rows,
            ("CompletionRequest", "best_of", "integer", {"maximum": limits.max_n}),
            ("CompletionRequest", "logprobs", "integer", {"maximum": limits.max_logprobs}),
            ("ChatCompletionRequest", "max_completion_tokens", "integer",
             {"maximum": max_tokens}),
            ("ChatCompletionRequest", "top_logprobs", "integer",
             {"maximum": limits.max_logprobs}),
            ("ResponsesRequest", "max_output_tokens", "integer", {"maximum": max_tokens})]


def _prompt_bounds(limits: Limits, token: dict) -> list[Bound]:
    """Prompts, chats and token lists; getattr: limits a Limits of another version may lack."""
    text = {"minLength": 1, "maxLength": getattr(limits, "max_prompt_chars", None)}
    chars = {"maxLength": text["maxLength"]}
    messages = getattr(limits, "max_messages", None)
    return [
        ("CompletionRequest", "prompt", "string", text),
        ("CompletionRequest", "prompt", "string[]",
         {"minItems": 1, "maxItems": limits.max_prompts, "items": text}),
        ("CompletionRequest", "prompt", "integer[]", {"minItems": 1, "items": token}),
        ("CompletionRequest", "prompt", "integer[][]",
         {"minItems": 1, "maxItems": limits.max_prompts, "items": {"minItems": 1, "items": token}}),
        ("ChatCompletionRequest", "messages", "ChatMessage[]",
         {"minItems": 1, "maxItems": messages}),
        ("ChatCompletionRequest", "tools", "object[]",
         {"maxItems": getattr(limits, "max_tools", None)}),
        ("ChatMessage", "content", "string", chars),
        ("ChatMessage", "content", "ContentPart[]",
         {"maxItems": getattr(limits, "max_content_parts", None)}),
        ("ContentPart", "text", "string", chars),
        ("TokenizeRequest", "prompt", "string", chars),
        ("TokenizeRequest", "messages", "ChatMessage[]", {"maxItems": messages}),
        ("DetokenizeRequest", "tokens", "integer[]", {"items": token}),
    ]


def _branches(prop: dict) -> list[dict]:
    return prop.get("anyOf", [prop])


def _kind(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if schema.get("type") == "array":
        return _kind(schema.get("items", {})) + "[]"
    return str(schema.get("type"))


def _merge(schema: dict, keywords: dict) -> None:
    """Add keywords to schema, into its nested schemas too; a None value is a limit not set."""
    for key, value in keywords.items():
        if isinstance(value, dict):
            _merge(schema.setdefault(key, {}), value)
        elif value is not None:
            schema[key] = value
