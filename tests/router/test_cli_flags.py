"""The router's API flags: `pagedserve router` builds its limits from them, and `serve` hands them
to its router child (the API key in the child's environment, never in its argv); `serve` starts
its router and scheduler at a lower priority."""

from __future__ import annotations

import os
import sys

import pytest

from pagedserve.cli import _router_core_options, build_parser
from pagedserve.router.limits import Limits
from pagedserve.serve import API_KEY_ENV, Child, ServiceSpec, build_specs


def test_router_flags_make_the_core_options(monkeypatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = build_parser().parse_args(["router", "--model", "m", "--max-n", "4",
                                      "--max-request-body-bytes", "1000",
                                      "--trust-request-chat-template"])
    options = _router_core_options(args)
    assert options["limits"] == Limits(max_n=4, max_request_body_bytes=1000)
    assert options["trust_request_chat_template"] and options["api_key"] is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert _router_core_options(args)["api_key"] == "from-env"
    args = build_parser().parse_args(["router", "--model", "m", "--api-key", "k"])
    assert _router_core_options(args)["api_key"] == "k"


def test_serve_passes_api_flags_to_the_router(tmp_path) -> None:
    args = build_parser().parse_args(["serve", "model", "--api-key", "top-secret", "--max-n", "4",
                                      "--max-queued-requests", "9",
                                      "--trust-request-chat-template"])
    router = next(s for s in build_specs(args, "model", str(tmp_path)) if s.name == "router")
    argv = " ".join(router.argv)
    assert "--max-n 4" in argv and "--max-queued-requests 9" in argv
    assert "--trust-request-chat-template" in argv and "--max-logprobs" not in argv
    assert "top-secret" not in argv and router.env == {API_KEY_ENV: "top-secret"}
    plain = build_parser().parse_args(["serve", "model"])
    router = next(s for s in build_specs(plain, "model", str(tmp_path)) if s.name == "router")
    assert router.env is None and "--max-n" not in " ".join(router.argv)


def test_serve_lowers_the_frontends_priority(tmp_path) -> None:
    specs = {s.name: s for s in build_specs(build_parser().parse_args(["serve", "m"]), "m",
                                            str(tmp_path))}
    assert (specs["executor"].nice, specs["scheduler"].nice, specs["router"].nice) == (0, 10, 10)
    off = build_parser().parse_args(["serve", "m", "--frontend-nice", "0"])
    assert all(s.nice == 0 for s in build_specs(off, "m", str(tmp_path)))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--frontend-nice", "-5"])


def test_a_child_starts_with_its_niceness_added(tmp_path) -> None:
    out = tmp_path / "nice"
    code = "import os, sys; open(sys.argv[1], 'w').write(str(os.nice(0)))"
    child = Child(ServiceSpec("probe", [sys.executable, "-c", code, str(out)], "unused", nice=3))
    child.start()
    assert child.proc is not None and child.proc.wait(timeout=30) == 0
    assert int(out.read_text()) == os.nice(0) + 3


def test_serve_passes_async_scheduling_to_its_scheduler(tmp_path) -> None:
    """serve's --[no-]async-scheduling reaches its scheduler child; nothing said keeps it on."""
    for flags, expected in (([], True), (["--no-async-scheduling"], False),
                            (["--async-scheduling"], True)):
        args = build_parser().parse_args(["serve", "m", *flags])
        spec = next(s for s in build_specs(args, "m", str(tmp_path)) if s.name == "scheduler")
        child = build_parser().parse_args(spec.argv[spec.argv.index("scheduler"):])
        assert child.async_scheduling is expected, flags
