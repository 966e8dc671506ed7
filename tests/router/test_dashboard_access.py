"""Who may read the dashboard: its page and script hold no data and are open to all; its state
follows /metrics' rule (the API key, or anyone with --metrics-public)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from pagedserve.router.http_middleware import ApiKeyMiddleware

PATHS = ("/dashboard", "/dashboard/dashboard.js", "/dashboard/state", "/metrics", "/v1/models")


def _statuses(metrics_public: bool, headers: dict[str, str]) -> dict[str, int]:
    async def ok(request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = ApiKeyMiddleware(Starlette(routes=[Route(p, ok) for p in PATHS]), "secret",
                           metrics_public)

    async def get_all() -> dict[str, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            return {p: (await client.get(p, headers=headers)).status_code for p in PATHS}

    return asyncio.run(get_all())


@pytest.mark.parametrize("metrics_public, key, open_paths", [
    (False, None, {"/dashboard", "/dashboard/dashboard.js"}),
    (True, None, {"/dashboard", "/dashboard/dashboard.js", "/dashboard/state", "/metrics"}),
    (False, "secret", set(PATHS)),
    (False, "wrong", {"/dashboard", "/dashboard/dashboard.js"}),
])
def test_only_the_static_files_are_open_without_the_key(metrics_public: bool, key: str | None,
                                                        open_paths: set[str]) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    statuses = _statuses(metrics_public, headers)
    assert {p for p, s in statuses.items() if s == 200} == open_paths
    assert all(s == 401 for p, s in statuses.items() if p not in open_paths)
