"""Where the step loop's time goes, summed since start (Stats reports these counters).

Per step that reaches the executor: seconds in `Scheduler.schedule()`, seconds from sending the
plan to receiving its result (the RPC, the executor's compute included), the executor's own compute
(`StepResult.execute_seconds`), seconds in `apply_result()` plus fanning the deltas out, and the
number of requests in the plan. rpc - execute is transport and (de)serialization; the step loop's
overhead is schedule + (rpc - execute) + apply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepTimings:
    steps: int = 0
    schedule_seconds: float = 0.0
    rpc_seconds: float = 0.0
    execute_seconds: float = 0.0
    apply_seconds: float = 0.0
    running_requests_sum: int = 0

    def add(self, *, schedule: float, rpc: float, execute: float, apply: float,
            running: int) -> None:
        """Counts one step's phases (seconds) and the number of requests in its plan."""
        assert min(schedule, rpc, execute, apply) >= 0.0 and running >= 0
        self.steps += 1
        self.schedule_seconds += schedule
        self.rpc_seconds += rpc
        self.execute_seconds += execute
        self.apply_seconds += apply
        self.running_requests_sum += running
