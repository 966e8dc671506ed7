"""A ShareGPT-like synthetic workload: long-tailed prompt and output lengths, fixed seed.

Lengths are log-normal around the medians ShareGPT shows (prompts about 120 tokens, outputs about
100), clipped to [4, 1024] and [4, 512]. Prompt tokens are random ids from the ordinary vocabulary;
each request's output length is enforced by max_tokens with ignore_eos, so every engine produces
exactly the same number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def _lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float,
                       low: int, high: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def sharegpt_like(num_requests: int, vocab_size: int, *, seed: int = 0,
                  first_token_id: int = 16, prompt_median: float = 120,
                  output_median: float = 100) -> list[BenchRequest]:
    """num_requests requests; token ids are drawn from [first_token_id, vocab_size)."""
    rng = np.random.default_rng(seed)
    prompt_lens = _lognormal_lengths(rng, num_requests, prompt_median, 0.9, 4, 1024)
    output_lens = _lognormal_lengths(rng, num_requests, output_median, 0.8, 4, 512)
    return [
        BenchRequest(rng.integers(first_token_id, vocab_size, int(p)).tolist(), int(o))
        for p, o in zip(prompt_lens, output_lens)
    ]
