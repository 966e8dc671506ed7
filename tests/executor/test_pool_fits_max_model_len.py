"""One request of max_model_len tokens must fit the KV pool alone: the executor cuts a default
max_model_len to the pool and refuses an explicit one that does not fit (before, the scheduler
refused it at every start and serve gave up after five restarts)."""

from __future__ import annotations

import pytest

from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.executor import Executor
from tests.conftest import model_dir


def test_a_default_max_model_len_is_cut_to_the_pool() -> None:
    executor = Executor(ExecutorConfig(model=str(model_dir("llama")), dtype="float32",
                                       num_kv_blocks=8, block_size=16))
    assert executor.describe().max_model_len == 8 * 16
    assert executor.batch.max_blocks_per_seq == 8


def test_an_explicit_max_model_len_past_the_pool_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_model_len: 256 tokens do not fit .* 128 tokens"):
        Executor(ExecutorConfig(model=str(model_dir("llama")), dtype="float32", num_kv_blocks=8,
                                block_size=16, max_model_len=256))
