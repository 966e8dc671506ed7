"""What the scheduler hands back: per-request output deltas and its counters."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.protos import executor_pb2


@dataclass(frozen=True)
class RequestOutputDelta:
    """What one request gained in one step.

    Tokens include a stopping EOS or stop token id. logprobs are per new token, when asked for;
    top logprobs are the executor's own messages, one per new token, passed on as they came (the
    user-facing form is made once, at the edge: the router's JSON, the offline LLM's dicts).
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    new_top_logprobs: list[executor_pb2.TopLogprobs] | None
    finished: bool
    finish_reason: str | None  # 'stop', 'length' or 'abort' once finished
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens found in the prefix cache at first admission


@dataclass(frozen=True)
class SchedulerStats:
    num_waiting: int
    num_running: int
    num_preemptions: int
    blocks_total: int
    blocks_free: int  # includes free blocks that still hold cached KV (evicted on reuse)
    blocks_in_use: int
    blocks_cached: int
    prefix_cache_queries: int  # tokens looked up at admission
    prefix_cache_hits: int  # of those, tokens found
    prefix_cache_hit_rate: float
    spec_draft_tokens: int = 0  # speculative decoding: proposed,
    spec_accepted_tokens: int = 0  # accepted,
    spec_verifications: int = 0  # and proposals checked
