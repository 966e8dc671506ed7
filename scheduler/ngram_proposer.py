"""Prompt lookup: propose the tokens that followed the last earlier occurrence of the sequence's
latest n tokens.

Input-grounded generation (quoting, editing, summarising a given text or code) repeats long runs
of its context; where the latest n tokens occurred before, the tokens that followed them there
are a cheap guess of what comes next. n runs from prompt_lookup_max down to prompt_lookup_min:
a longer match is better evidence. Among matches of one length the most recent wins (it is the
likeliest to be the passage being quoted). Costs one vectorised scan of the tokens per n.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagedserve.scheduler.speculative_config import SpeculativeConfig


def propose_ngram(tokens: list[int], config: SpeculativeConfig, max_tokens: int) -> list[int]:
    """Up to max_tokens proposed tokens following `tokens`; [] when nothing matches."""
    k = min(max_tokens, config.num_speculative_tokens)
    if k <= 0 or len(tokens) < config.prompt_lookup_min + 1:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(config.prompt_lookup_max, len(seq) - 1), config.prompt_lookup_min - 1, -1):
        # windows starting before the suffix itself: an earlier occurrence with a continuation
        windows = sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return seq[start:start + k].tolist()
    return []
