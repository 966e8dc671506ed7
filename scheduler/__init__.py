"""The scheduler: request queue, continuous batching, the page table and the step loop.

Pure Python over the protos; it never imports torch, an executor, the router or kernels.
"""

from scheduler.config import SchedulerConfig
from scheduler.interface import ExecutorClient
from scheduler.outputs import RequestOutputDelta, SchedulerStats
from scheduler.scheduler import Scheduler

__all__ = ["ExecutorClient", "RequestOutputDelta", "Scheduler", "SchedulerConfig",
           "SchedulerStats"]
