"""Building the CPU kernels: the switch that turns them off, a compiler that fails, and a cache
that a second build reuses."""

from __future__ import annotations

import shutil

import pytest

from kernels.cpu import build


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv(build.ENV_DISABLE, "1")
    lib, why = build.load.__wrapped__("rotary")
    assert lib is None and build.ENV_DISABLE in why


def test_failing_compiler_gives_the_reason(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    lib, why = build.load.__wrapped__("rotary")
    assert lib is None and "rotary.c" in why
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind


def test_built_library_is_cached_and_reused(monkeypatch, tmp_path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    lib, why = build.load.__wrapped__("rotary")
    assert lib is not None, why
    built = list(tmp_path.rglob("rotary-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert build.load.__wrapped__("rotary")[0] is not None
    assert list(tmp_path.rglob("rotary-*.so")) == built and built[0].stat().st_mtime_ns == mtime
