"""ASGI middleware of the HTTP API, outermost first:

RequestIdMiddleware   every response carries X-Request-Id (the client's own when it is sane, else
                      the response's id, else a new one); every log line of the request is bound
                      to it; an unexpected exception becomes a logged 500 in OpenAI's shape.
ApiKeyMiddleware      with an API key set, every path but /health wants `Authorization: Bearer KEY`
                      (compared in constant time); else 401.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

import structlog

from pagedserve.router.core import random_id
from pagedserve.router.errors import RouterError, internal_error, unauthorized
from pagedserve.router.request_trace import client_traceparent

log = structlog.get_logger("pagedserve.router")
_REQUEST_ID_OK = re.compile(r"^[\w.:@/-]{1,128}$")
OPEN_PATHS = frozenset({"/health"})
DASHBOARD_STATIC = frozenset({"/dashboard", "/dashboard/dashboard.js"})
DASHBOARD_STATE = "/dashboard/state"


async def send_error(send: Any, e: RouterError, request_id: str | None = None) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers.items()]
    if request_id:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(e.to_dict()).encode()})


def bind_request_id(scope: dict, request_id: str) -> None:
    """Make `request_id` the id of this request's response header and log lines."""
    scope.setdefault("state", {})["request_id"] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)


class RequestIdMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        client_traceparent.set(headers.get(b"traceparent", b"").decode("latin-1"))
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        state = scope.setdefault("state", {})
        state["client_request_id"] = given if _REQUEST_ID_OK.match(given) else None
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                rid = state.get("client_request_id") or state.get("request_id")
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        with structlog.contextvars.bound_contextvars(path=scope.get("path")):
            bind_request_id(scope, state["client_request_id"] or random_id())
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                rid = state.get("client_request_id") or state.get("request_id")
                log.exception("internal error", request_id=rid)
                if not started:
                    await send_error(send, internal_error(rid), rid)
            finally:
                structlog.contextvars.unbind_contextvars("request_id")


class ApiKeyMiddleware:
    def __init__(self, app: Any, api_key: str, metrics_public: bool = False) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        # The dashboard's page and script hold no data (the page asks for the key); its data,
        # like /metrics, is open only with --metrics-public (a scraper or a wall screen).
        self.open_paths = OPEN_PATHS | DASHBOARD_STATIC
        if metrics_public:
            self.open_paths |= {"/metrics", DASHBOARD_STATE}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in self.open_paths:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await send_error(send, unauthorized())
        await self.app(scope, receive, send)
