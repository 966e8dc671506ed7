from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import model_dir


@pytest.fixture(scope="session")
def llama_dir() -> Path:
    return model_dir("llama")
