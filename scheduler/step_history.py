"""The last few hundred steps, for the dashboard's budget bar and sparklines: how many tokens each
step spent on prompts and on decoding, what it emitted and how long it took.

A step's prompt share is read from the plan right after `Scheduler.schedule()`, which has already
counted the scheduled tokens as computed: a request that now has c computed tokens and was given n
(drafts aside) computed positions c - n .. c - 1, of which those below its prompt length are
prefill.
"""

from __future__ import annotations

import time
from collections import deque

from pagedserve.protos import executor_pb2, scheduler_pb2
from pagedserve.scheduler.scheduler import Scheduler

HISTORY_STEPS = 300


def request_split(scheduler: Scheduler, plan: executor_pb2.StepPlan
                  ) -> list[tuple[str, int, int]]:
    """(request id, prompt tokens, decode tokens incl. drafts) of each request in a plan just
    returned by schedule()."""
    entries = [(r.request_id, r.num_scheduled_tokens, 0) for r in plan.new_requests]
    # drafts: the scheduler's own, or those the executor's draft model will propose
    entries += [(r.request_id, r.num_scheduled_tokens,
                 len(r.draft_token_ids) + getattr(r, "num_speculative_tokens", 0))
                for r in plan.continuing_requests]
    split = []
    for rid, scheduled, drafts in entries:
        req = scheduler.requests.get(rid)
        if req is None:
            continue
        start = req.num_computed_tokens - (scheduled - drafts)
        in_prompt = max(0, min(req.num_computed_tokens, req.num_prompt_tokens) - start)
        split.append((rid, in_prompt, scheduled - in_prompt))
    return split


def prefill_decode_split(scheduler: Scheduler, plan: executor_pb2.StepPlan) -> tuple[int, int]:
    """(prompt tokens, decode tokens incl. drafts) of a plan just returned by schedule()."""
    split = request_split(scheduler, plan)
    return sum(p for _, p, _ in split), sum(d for _, _, d in split)


class StepHistory:
    """A ring of the latest HISTORY_STEPS steps (a bounded, O(1) record per step)."""

    def __init__(self, size: int = HISTORY_STEPS) -> None:
        self.samples: deque[scheduler_pb2.StepSample] = deque(maxlen=size)

    def record(self, *, seconds: float, prefill: int, decode: int, outputs: int,
               requests: int) -> None:
        self.samples.append(scheduler_pb2.StepSample(
            end_time=time.time(), seconds=seconds, prefill_tokens=prefill, decode_tokens=decode,
            output_tokens=outputs, num_requests=requests))
