"""Seeded random workloads (see sched_workload): same outputs as an unconstrained run."""

import random

import pytest

from tests.scheduler.sched_workload import check_workload, random_workload


@pytest.mark.parametrize("seed", range(40))
def test_random_workload(seed: int) -> None:
    check_workload(random_workload(random.Random(seed)))
