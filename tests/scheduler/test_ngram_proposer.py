"""Prompt lookup against a plain-loop reading of its rule, and the scheduler's proposal limits."""

from __future__ import annotations

import random

import pytest

from pagedserve.scheduler.ngram_proposer import propose_ngram
from pagedserve.scheduler.speculative_config import SpeculativeConfig


def brute_force(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """The longest n in [lo, hi] whose last n tokens occurred earlier; the latest such
    occurrence's next k tokens."""
    for n in range(hi, lo - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_rule_read_literally(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = rng.choice([2, 3, 5, 20])
    tokens = [rng.randrange(alphabet) for _ in range(rng.randrange(1, 60))]
    lo = rng.randint(1, 3)
    config = SpeculativeConfig(num_speculative_tokens=rng.randint(1, 6), prompt_lookup_min=lo,
                               prompt_lookup_max=rng.randint(lo, 5))
    k = rng.randint(0, 8)
    expected = brute_force(tokens, config.prompt_lookup_min, config.prompt_lookup_max,
                           min(k, config.num_speculative_tokens))
    assert propose_ngram(tokens, config, k) == expected


def test_prefers_the_longer_match_and_then_the_latest() -> None:
    config = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    # "7 8" was followed by 1 and later by 2; "6 7 8" only by 1: the 3-gram wins
    assert propose_ngram([6, 7, 8, 1, 9, 7, 8, 2, 5, 6, 7, 8], config, 3) == [1, 9, 7]
    assert propose_ngram([7, 8, 1, 9, 7, 8, 2, 5, 7, 8], config, 3) == [2, 5, 7]
    assert propose_ngram([1, 2, 3], config, 3) == []


def _request(prompt: list[int], outputs: list[int], max_tokens: int, blocks: int):
    from pagedserve.protos import executor_pb2
    from pagedserve.scheduler.request import Request, StopParams

    req = Request("r", prompt, executor_pb2.SamplingParams(), StopParams(max_tokens), 0,
                  output_token_ids=outputs)
    req.num_computed_tokens = req.num_tokens - 1  # decoding: the last output is not computed
    req.block_ids = list(range(blocks))
    return req


@pytest.mark.parametrize(("max_tokens", "max_model_len", "budget", "blocks", "spare", "want"), [
    (100, 1000, 100, 4, 0, 6),  # the proposer's own limit
    (5, 1000, 100, 4, 0, 1),  # 3 outputs: 1 draft + 1 more reach max_tokens 5
    (100, 18, 100, 4, 0, 1),  # 17 tokens held: one draft position left below max_model_len
    (100, 1000, 3, 4, 0, 2),  # the step's token budget: 1 + 2
    (100, 1000, 100, 1, 0, 0),  # the block is full and no spare block may be taken
    (100, 1000, 100, 1, 1, 6),  # one spare block
])
def test_proposals_stay_within_every_limit(max_tokens, max_model_len, budget, blocks, spare,
                                           want) -> None:
    from pagedserve.scheduler.speculation import Speculator

    config = SpeculativeConfig(num_speculative_tokens=6)
    asked = []
    speculator = Speculator(config, 16, max_model_len,
                            propose=lambda tokens, cfg, k: asked.append(k) or [7] * 10)
    req = _request(list(range(14)), [1, 2, 3], max_tokens, blocks)
    assert req.num_tokens == 17
    drafts = speculator.drafts(req, 1, budget, spare, num_running=1)
    assert drafts == [7] * want
    assert asked == ([want] if want else [])  # the proposer is asked for no more


def test_a_request_whose_drafts_keep_failing_is_proposed_to_rarely() -> None:
    from pagedserve.scheduler.speculation import POOR_EVERY, POOR_MIN_DRAFTS, Speculator

    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=4), 16, 1000,
                            propose=lambda tokens, cfg, k: [7] * k)
    req = _request(list(range(14)), [1, 2, 3], 1000, 40)
    proposed = []
    for _ in range(60):
        drafts = speculator.drafts(req, 1, 100, 0, num_running=1)
        proposed.append(bool(drafts))
        out = [8]  # the executor rejects the first draft every time
        speculator.accepted(req, drafts, out)
        req.append_output(8)
        req.num_computed_tokens = req.num_tokens - 1
    first_rare = POOR_MIN_DRAFTS // 4
    assert all(proposed[:first_rare])
    later = proposed[first_rare:]
    assert 0 < sum(later) <= len(later) // POOR_EVERY + 1
    assert speculator.counters.accepted_tokens == 0
