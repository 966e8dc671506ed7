"""The near-tie rule of tests/hf_reference.py, which every comparison with transformers relies on:
a divergence passes only between each side's two best tokens with a small gap, and a test may end
only a few of its prompts early that way."""

from __future__ import annotations

import pytest
import torch

from tests.hf_reference import (
    NEAR_TIES,
    TIE,
    NearTies,
    Reference,
    assert_greedy_matches,
    assert_near_tie,
)


def logprobs(*best: float, vocab: int = 16) -> torch.Tensor:
    """log_softmax-like row: tokens 0, 1, 2, ... hold `best`, the rest far below."""
    row = torch.full((vocab,), -20.0)
    row[: len(best)] = torch.tensor(best)
    return row


def test_a_tie_between_the_two_best_passes() -> None:
    lp = logprobs(-0.70, -0.70 - TIE / 2, -3.0)
    assert_near_tie(4, 1, 0, lp, {1: -0.69, 0: -0.70, 2: -3.0}, 10)


@pytest.mark.parametrize("mine,theirs,lp,our_top,why", [
    (2, 0, logprobs(-0.70, -0.705, -0.71), {2: -0.69, 0: -0.70, 1: -0.71}, "ours is their 3rd"),
    (1, 0, logprobs(-0.70, -0.705, -0.71), {1: -0.69, 2: -0.695, 0: -0.70}, "theirs is our 3rd"),
    (1, 0, logprobs(-0.70, -0.70 - TIE, -3.0), {1: -0.69, 0: -0.70}, "the gap is not small"),
])
def test_other_divergences_fail(mine, theirs, lp, our_top, why) -> None:
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_near_tie(4, mine, theirs, lp, our_top, 10)


def test_early_exits_are_bounded_per_test() -> None:
    ties = NearTies(compared=8, ended_early=2)
    ties.check()  # a quarter
    ties.ended_early = 3
    with pytest.raises(AssertionError, match="3 of 8 prompts ended early"):
        ties.check()
    NearTies(compared=1, ended_early=1).check()  # one prompt may meet one genuine tie


def test_assert_greedy_matches_counts_the_early_exit() -> None:
    NEAR_TIES.reset()
    rows = torch.stack([logprobs(-0.5, -2.0), logprobs(-0.69, -0.70), logprobs(-0.5, -2.0)])
    ref = Reference(prompt=[1, 2], tokens=[0, 0, 0], logprobs=rows)
    tops = [{0: -0.5, 1: -2.0}, {1: -0.69, 0: -0.695}, {1: -0.5}]
    assert_greedy_matches([0, 1, 1], tops, ref)  # ends at output 1, a near-tie
    assert (NEAR_TIES.compared, NEAR_TIES.ended_early) == (1, 1)
    assert_greedy_matches([0, 0, 0], [tops[0], {0: -0.69, 1: -0.70}, tops[0]], ref)
    assert (NEAR_TIES.compared, NEAR_TIES.ended_early) == (2, 1)
