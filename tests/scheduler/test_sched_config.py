"""SchedulerConfig validation and the scheduler's agreement check with the executor."""

import pytest

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.driver import StepDriver
from pagedserve.scheduler.scheduler import Scheduler
from tests.scheduler.sched_fakes import FakeExecutor


def test_defaults() -> None:
    cfg = SchedulerConfig(block_size=16, num_kv_blocks=100, max_model_len=256)
    assert cfg.max_num_seqs == 256
    assert cfg.max_num_batched_tokens == 2048
    assert cfg.enable_prefix_caching is True
    assert cfg.eos_token_ids == ()
    assert cfg.max_blocks_per_request == 16


@pytest.mark.parametrize("field,value", [
    ("block_size", 0), ("num_kv_blocks", -1), ("max_model_len", 0), ("max_num_seqs", 0),
    ("max_num_batched_tokens", 0), ("block_size", 1.5), ("max_num_seqs", True),
    ("eos_token_ids", [2]), ("eos_token_ids", (-1,)),
])
def test_invalid_field_is_named(field: str, value: object) -> None:
    kwargs = {"block_size": 4, "num_kv_blocks": 8, "max_model_len": 16, field: value}
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_max_model_len_must_fit_the_pool() -> None:
    SchedulerConfig(block_size=4, num_kv_blocks=4, max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(block_size=4, num_kv_blocks=4, max_model_len=17)


def test_frozen() -> None:
    cfg = SchedulerConfig(block_size=4, num_kv_blocks=8, max_model_len=16)
    with pytest.raises(AttributeError):
        cfg.block_size = 8  # type: ignore[misc]


def test_from_describe() -> None:
    desc = executor_pb2.DescribeResponse(block_size=16, num_kv_blocks=50, max_model_len=512,
                                         eos_token_ids=[2, 7])
    cfg = SchedulerConfig.from_describe(desc, max_num_seqs=8)
    assert (cfg.block_size, cfg.num_kv_blocks, cfg.max_model_len) == (16, 50, 512)
    assert cfg.eos_token_ids == (2, 7)
    assert cfg.max_num_seqs == 8
    with pytest.raises(TypeError, match="bogus"):
        SchedulerConfig.from_describe(desc, bogus=1)


def test_scheduler_rejects_a_config_the_executor_cannot_back() -> None:
    fake = FakeExecutor(block_size=4, num_blocks=8, max_model_len=32)
    with pytest.raises(ValueError, match="block_size"):
        StepDriver(Scheduler(SchedulerConfig(block_size=8, num_kv_blocks=8, max_model_len=32)), fake)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        StepDriver(Scheduler(SchedulerConfig(block_size=4, num_kv_blocks=9, max_model_len=32)), fake)
    with pytest.raises(ValueError, match="max_model_len"):
        StepDriver(Scheduler(SchedulerConfig(block_size=4, num_kv_blocks=8, max_model_len=64)), fake)
    StepDriver(Scheduler(SchedulerConfig(block_size=4, num_kv_blocks=6, max_model_len=24)), fake)
