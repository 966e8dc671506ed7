"""The scheduler's configuration: one frozen object, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.speculative_config import SpeculativeConfig


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler needs to know about the KV pool and its batching limits.

    block_size and num_kv_blocks must match the executor's (see `from_describe`). A request of
    max_model_len tokens must fit the pool on its own, so that preempting every other request always
    lets the oldest one finish.
    """

    block_size: int
    num_kv_blocks: int
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    eos_token_ids: tuple[int, ...] = ()
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    vocab_size: int = 0  # token ids are checked against it at admission (0: int32 range only)
    # the step loop plans and sends the next step while one runs, where Scheduler.schedule_ahead
    # can (decoding requests only), so the executor never waits on the round trip
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_blocks", "max_model_len", "max_num_seqs",
                     "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.eos_token_ids, tuple) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0
                for t in self.eos_token_ids):
            raise ValueError(
                f"eos_token_ids must be a tuple of non-negative ints, got {self.eos_token_ids!r}")
        if self.max_blocks_per_request > self.num_kv_blocks:
            raise ValueError(
                f"max_model_len={self.max_model_len} needs {self.max_blocks_per_request} blocks "
                f"of {self.block_size} tokens but num_kv_blocks={self.num_kv_blocks}")

    @property
    def max_blocks_per_request(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def check_executor(self, desc: executor_pb2.DescribeResponse) -> None:
        """ValueError unless an executor that describes itself so can run this config's plans."""
        if desc.block_size != self.block_size:
            raise ValueError(f"block_size={self.block_size} but the executor's is {desc.block_size}")
        if self.num_kv_blocks > desc.num_kv_blocks:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} but the executor has only "
                             f"{desc.num_kv_blocks}")
        if 0 < desc.max_model_len < self.max_model_len:
            raise ValueError(f"max_model_len={self.max_model_len} but the executor's is "
                             f"{desc.max_model_len}")
        spec = self.speculative
        if spec is not None and spec.executor_proposes and not desc.draft_model:
            raise ValueError(f"speculative_config.method {spec.method!r}, but the executor has "
                             "no draft model (give it the same --speculative-config)")

    @classmethod
    def from_describe(cls, desc: executor_pb2.DescribeResponse, **overrides: Any) -> SchedulerConfig:
        """A config whose pool and model facts come from the executor, other fields from overrides."""
        facts: dict[str, Any] = {
            "block_size": desc.block_size,
            "num_kv_blocks": desc.num_kv_blocks,
            "max_model_len": desc.max_model_len,
            "eos_token_ids": tuple(desc.eos_token_ids),
            "vocab_size": desc.vocab_size,
        }
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown SchedulerConfig fields: {sorted(unknown)}")
        return cls(**{**facts, **overrides})
