"""Which logits rows a step samples, and what each row's sampler sees, with speculative drafts.

A request that samples without drafts has one row: its last scheduled token. With drafts d1..dk
it has k + 1: the rows of its last held token and of each draft, the j-th of which samples the
token at output position (outputs so far) + j, as if d1..dj had been accepted. Each such row gets
a view of the request holding those drafts as outputs, so penalties, min_tokens and the seeded
uniform (seed, output position) see exactly what they would see without speculation.

Verification keeps a draft while it equals the token its row sampled, and ends at the first row
whose token differs (that token is the output) or after the last draft (one more token). The
proposals are deterministic (one token each, probability 1), so this is the rejection rule of
speculative sampling (accept d with probability p(d); on rejection draw from p without d): the
row's draw equals d with probability p(d), and otherwise is a draw from p conditioned on not d.
Hence a greedy or seeded request gives exactly the tokens it gives without speculation.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.executor.request_state import RequestState


@dataclass
class SampleRows:
    states: list[RequestState]  # the requests that sample, in batch order
    drafts: list[list[int]]  # each one's drafts ([] for most; read, never written)
    views: list[RequestState]  # one per logits row: the request with the drafts before it
    flat_rows: list[int]  # each logits row's row in the flat batch

    @property
    def has_drafts(self) -> bool:
        return len(self.views) > len(self.states)

    @property
    def request_ids(self) -> list[str]:
        return [v.request_id for v in self.views]


def sample_rows(scheduled: Sequence[tuple[RequestState, int]], samples: Sequence[int],
                drafts: dict[str, list[int]]) -> SampleRows:
    """The sampling rows of the requests at positions `samples` of the step's scheduled list."""
    if not drafts:  # the common step: one row per request, and flat rows only if some do not
        states = [scheduled[i][0] for i in samples]
        flat = [] if len(samples) == len(scheduled) else _last_rows(scheduled, samples)
        return SampleRows(states, [[]] * len(states), states, flat)
    ends = list(itertools.accumulate(n for _, n in scheduled))
    states, request_drafts, views, flat = [], [], [], []
    for i in samples:
        state = scheduled[i][0]
        ds = drafts.get(state.request_id, [])
        states.append(state)
        request_drafts.append(ds)
        views.append(state)
        views.extend(dataclasses.replace(state, output_token_ids=state.output_token_ids + ds[:j])
                     for j in range(1, len(ds) + 1))
        flat.extend(range(ends[i] - len(ds) - 1, ends[i]))
    return SampleRows(states, request_drafts, views, flat)


def _last_rows(scheduled: Sequence[tuple[RequestState, int]], samples: Sequence[int]) -> list[int]:
    ends = list(itertools.accumulate(n for _, n in scheduled))
    return [ends[i] - 1 for i in samples]


def num_accepted(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """How many drafts verification keeps: the leading ones equal to their row's sampled token."""
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return j
    return len(drafts)
