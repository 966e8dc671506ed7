"""Shared fixtures: tiny test models built once per machine with `make-model`."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _cache_root() -> Path:
    # Keyed by make_model.py's content, so a change to the recipe rebuilds the models.
    digest = hashlib.sha256((ROOT / "pagedserve" / "make_model.py").read_bytes()).hexdigest()[:12]
    base = Path(os.environ.get("PAGEDSERVE_TEST_MODELS", ROOT / ".models" / "test"))
    return base / digest


def model_dir(arch: str, preset: str = "tiny", seed: int = 0) -> Path:
    """Build (once, with a lock-free rename) and return an HF-format test model directory."""
    from pagedserve.make_model import make_model

    out = _cache_root() / f"{arch}-{preset}-{seed}"
    if (out / "pagedserve.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    make_model(arch, preset, tmp, seed=seed)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request) -> Path:
    """Each of the four architectures' tiny model (parametrised)."""
    return model_dir(request.param)


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return model_dir("llama")


@pytest.fixture
def panel_gemm_path(monkeypatch) -> None:
    """kernels/cpu/panel_gemm's AVX2 path, in use for the test on any CPU that executes AVX2:
    an AVX-512 CPU (which the default build gives no path) runs a build without AVX-512."""
    from pagedserve.kernels.cpu import panel_gemm

    if not panel_gemm.available():
        monkeypatch.setattr(panel_gemm, "BUILD_FLAGS", ("-mno-avx512f",))
    if not panel_gemm.available():
        pytest.skip("panel_gemm has a path for CPUs with AVX2 and FMA only")


@pytest.fixture
def onednn_bf16_path(monkeypatch) -> None:
    """bf16 weights on oneDNN's kernels, also where panel_gemm512 is preferred (an Intel Xeon)."""
    from pagedserve.kernels.cpu import panel_gemm512

    monkeypatch.setattr(panel_gemm512, "preferred", lambda: False)


@pytest.fixture
def paired_bf16_path(monkeypatch) -> None:
    """bf16 weights in panel_gemm512's paired panels, also where vdpbf16ps is the faster one."""
    from pagedserve.kernels.cpu import panel_gemm512

    if not panel_gemm512.available():
        pytest.skip("panel_gemm512 needs AVX-512")
    monkeypatch.setattr(panel_gemm512, "preferred", lambda: True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Around each test's body: the near-tie count of tests/hf_reference.py starts at zero, and
    a test that let too many prompts end early at a near-tie fails (NEAR_TIES.check). Looked up
    only when some test imported the module, so tests that never compare with transformers do not
    import torch here."""
    ties = getattr(sys.modules.get("tests.hf_reference"), "NEAR_TIES", None)
    if ties is not None:
        ties.reset()
    result = yield
    ties = getattr(sys.modules.get("tests.hf_reference"), "NEAR_TIES", None)
    if ties is not None:
        ties.check()
    return result


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (fetched once, pagedserve/real_model.py), or a skip."""
    from pagedserve.real_model import ModelUnavailable, real_model_path

    try:
        return real_model_path()
    except ModelUnavailable as e:
        pytest.skip(f"real model unavailable: {e}")
