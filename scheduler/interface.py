"""The one interface the scheduler uses to reach an executor.

Two implementations satisfy it by duck typing: the in-process executor object (used by `LLM` and by
tests) and a gRPC client. Both exchange the same protobuf messages, so in-process runs exercise the
real contract.
"""

from __future__ import annotations

from typing import Protocol

from pagedserve.protos import executor_pb2


class ExecutorClient(Protocol):
    def describe(self) -> executor_pb2.DescribeResponse:
        """Model facts and the KV capacity in blocks."""
        ...

    def execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        """Runs one step: forget ids first, then new and continuing requests."""
        ...
