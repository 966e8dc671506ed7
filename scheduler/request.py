"""One request's state as the scheduler sees it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.block_pool import BlockHash


class RequestStatus(enum.Enum):
    WAITING = "waiting"              # never admitted yet
    RUNNING = "running"              # holds blocks; the executor holds its state
    PREEMPTED = "preempted"          # back in the waiting queue, to be recomputed
    FINISHED_STOPPED = "stop"        # EOS or a stop token id
    FINISHED_LENGTH = "length"       # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style reason: 'stop', 'length' or 'abort'; None while unfinished."""
        return self.value if self.is_finished else None


@dataclass(frozen=True)
class StopParams:
    max_tokens: int
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False


@dataclass(eq=False)
class Request:
    """Tokens held = prompt + outputs; tokens computed = those whose KV is in the block table."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: executor_pb2.SamplingParams
    stop: StopParams
    arrival: int
    cache_salt: str = ""
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # How many of block_ids the executor has been sent (the rest go in the next ContinuingRequest).
    num_sent_blocks: int = 0
    # Hashes of the full blocks of all held tokens, grown lazily.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # How many leading blocks of block_ids were offered to the prefix cache (registered by hash).
    num_blocks_offered_to_cache: int = 0
    # Prefix-cache hit in tokens at first admission (usage: cached prompt tokens); -1 before that.
    num_cached_tokens: int = -1
    # Speculative decoding (written by scheduler/speculation.py): drafts proposed and accepted.
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def extra_keys(self) -> tuple[str, ...]:
        """What besides tokens decides the KV content, for block hashes."""
        return (self.cache_salt,) if self.cache_salt else ()

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
