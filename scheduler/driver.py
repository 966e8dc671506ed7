"""One process, no network: the step a driver runs over a Scheduler and an executor.

    plan = scheduler.schedule()  ->  executor.execute(plan)  ->  scheduler.apply_result(result)

The offline `LLM` and the tests drive steps this way, with an in-process executor or a gRPC
client; the scheduler server's step loop (step_loop.py) runs the same three calls over its
async Execute stream.
"""

from __future__ import annotations

from pagedserve.protos import executor_pb2
from pagedserve.scheduler.interface import ExecutorClient
from pagedserve.scheduler.outputs import RequestOutputDelta
from pagedserve.scheduler.scheduler import Scheduler


class StepDriver:
    def __init__(self, scheduler: Scheduler, executor: ExecutorClient) -> None:
        scheduler.config.check_executor(executor.describe())
        self.scheduler = scheduler
        self.executor = executor

    def step(self) -> list[RequestOutputDelta]:
        """One step; a plan with nothing in it is not sent."""
        plan = self.scheduler.schedule()
        if plan.new_requests or plan.continuing_requests or plan.forget_request_ids:
            result = self.executor.execute(plan)
        else:
            result = executor_pb2.StepResult(step_id=plan.step_id)
        return self.scheduler.apply_result(result)
