"""Building the CPU kernels: the switch that turns them off, a compiler that fails, a cache that
a second build reuses, and every SIMD path compiling cleanly on any machine."""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from pagedserve.kernels.cpu import build


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


# Every SIMD path this repository has, as a compiler target: the AVX-512 + bf16 one (Zen 4,
# Cooper Lake and later), AVX2 + FMA without AVX-512 (Zen 3) and plain x86-64 (the portable loops).
SIMD_TARGETS = {"avx512-bf16": ["-march=x86-64-v4", "-mavx512bf16"], "avx2": ["-march=x86-64-v3"],
                "portable": ["-march=x86-64"]}


@pytest.mark.parametrize("target", sorted(SIMD_TARGETS))
@pytest.mark.parametrize("name", sorted(p.stem for p in build.SOURCE_DIR.glob("*.c")))
def test_every_simd_path_compiles_cleanly(name, target, tmp_path) -> None:
    """A path this machine cannot run is still compiled, warnings as errors, so a change made on
    one kind of CPU does not break another kind's build (which would fall back to the reference
    kernels there, silently slower)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no C compiler, or not an x86-64 machine")
    flags = [f for f in build.FLAGS if not f.startswith("-march") and f != "-shared"]
    source = build.SOURCE_DIR / f"{name}.c"
    result = subprocess.run(
        [compiler, *flags, *SIMD_TARGETS[target], "-O1", "-fopenmp", "-Wall", "-Wextra", "-Werror",
         f"-I{build.SOURCE_DIR}", "-c", str(source), "-o", str(tmp_path / f"{name}.o")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
