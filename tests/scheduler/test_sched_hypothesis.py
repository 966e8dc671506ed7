"""Hypothesis drives the random workload generator (see sched_workload)."""

import random

import pytest

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

from tests.scheduler.sched_workload import check_workload, random_workload  # noqa: E402


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(st.randoms(use_true_random=False))
def test_random_workload_hypothesis(rng: random.Random) -> None:
    check_workload(random_workload(rng))
