"""Sampled requests keep the target model's distribution under speculation: a chi-square test of
the token sampled where a draft was verified, with and without speculation, over many seeds; and
the same test fails a deliberately wrong acceptance rule (every draft kept), so it can fail.

Speculation here is forced: the proposer offers one fixed token after each request's first output
(the model is random: prompt lookup would propose nothing; three tokens leave room for a draft
and the token after it). Seeds differ between the runs, so the
two samples are independent draws; top_k keeps the support small enough for the test's bins."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.executor import executor as executor_module
from tests.conftest import model_dir

N = 1200  # samples per run
PROMPT = [11, 12, 13, 14]
DRAFT = 77  # the token always proposed after the first output


def _second_tokens(speculate: bool, seed0: int) -> Counter:
    options = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 1}} \
        if speculate else {}
    engine = LLM(model_dir("llama"), dtype="float32", num_kv_blocks=256, max_num_seqs=256,
                 **options)
    if speculate:
        def propose(tokens, config, k):
            return [DRAFT] if len(tokens) == len(PROMPT) + 1 else []
        engine.scheduler.speculator.propose = propose
    params = [SamplingParams(temperature=1.3, top_k=6, seed=seed0 + i, max_tokens=3,
                             ignore_eos=True) for i in range(N)]
    outs = engine.generate([{"prompt_token_ids": PROMPT}] * N, params, use_tqdm=False)
    if speculate:
        assert engine.scheduler.stats().spec_draft_tokens >= N // 2
    return Counter(o.outputs[0].token_ids[1] for o in outs)


def chi_square(a: Counter, b: Counter) -> tuple[float, int]:
    """The two-sample chi-square statistic over tokens seen at least 10 times in all (the rest
    pooled in one bin) and its degrees of freedom."""
    n_a, n_b = sum(a.values()), sum(b.values())
    keys = [t for t in a.keys() | b.keys() if a[t] + b[t] >= 10]
    bins = [(a[t], b[t]) for t in keys]
    rest = (n_a - sum(x for x, _ in bins), n_b - sum(y for _, y in bins))
    if sum(rest):
        bins.append(rest)
    stat = 0.0
    for x, y in bins:
        total = x + y
        ex, ey = total * n_a / (n_a + n_b), total * n_b / (n_a + n_b)
        stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
    return stat, len(bins) - 1


def critical(df: int) -> float:
    """The chi-square quantile at p = 0.999 (Wilson-Hilferty; z = 3.09)."""
    z = 3.090
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def plain() -> Counter:
    return _second_tokens(False, seed0=0)


def test_speculation_keeps_the_distribution(plain: Counter) -> None:
    spec = _second_tokens(True, seed0=10_000)
    stat, df = chi_square(plain, spec)
    assert df >= 4, plain
    assert stat < critical(df), (stat, df, plain, spec)


def test_a_wrong_acceptance_rule_fails_the_test(plain: Counter, monkeypatch) -> None:
    """Keeping every draft (instead of only those the target's sample confirms) skews the
    verified token toward the draft; the statistic must see it."""
    take_tokens = executor_module.Executor._take_tokens

    def keep_every_draft(self, rows, out, num_logprobs):
        row = 0
        for drafts in rows.drafts:  # each draft row "samples" its draft
            out.token_ids[row:row + len(drafts)] = drafts
            row += len(drafts) + 1
        return take_tokens(self, rows, out, num_logprobs)

    monkeypatch.setattr(executor_module.Executor, "_take_tokens", keep_every_draft)
    wrong = _second_tokens(True, seed0=10_000)
    stat, df = chi_square(plain, wrong)
    assert stat > critical(df), (stat, df)
