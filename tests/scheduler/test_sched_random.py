"""Seeded random workloads (see sched_workload): same outputs as an unconstrained run."""

import random

import pytest

from tests.scheduler.sched_workload import check_workload, random_workload


@pytest.mark.parametrize("seed", range(40))
def test_random_workload(seed: int) -> None:
    check_workload(random_workload(random.Random(seed)))


def test_random_workloads_scheduled_ahead() -> None:
    """Async scheduling (Scheduler.schedule_ahead), the executor running each plan as soon as it
    is made: the same outputs, KV reads and block accounting as the unconstrained synchronous
    run, under aborts, restarts, preemption and prefix sharing; and the ahead path is taken."""
    ahead = sum(check_workload(random_workload(random.Random(seed)), ahead=True).ahead
                for seed in range(200))
    assert ahead > 500
