"""The one thread that runs the model in a served executor: it loads the weights and runs every step.

OpenMP (torch's CPU kernels, oneDNN, kernels/cpu) keeps a team of worker threads for each thread
that opens parallel regions. gRPC runs handlers on pool threads, so a model loaded on the main
thread and stepped on a handler thread gives the process two teams; libgomp then counts more
threads than CPUs and stops its workers spinning between regions. They sleep at every barrier,
about a hundred times per decode step, and on a machine shared with the router, the scheduler and
clients each wake-up waits for a CPU (docs/benchmarks.md, "CPU GEMM paths", has the figure).
Running everything on this thread keeps one team, as offline.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """Runs calls one at a time, in order, on one daemon thread (a daemon, so a signal that ends
    the process during a model load does not wait for the load to finish)."""

    def __init__(self, name: str = "executor-compute") -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple, Future] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the compute thread; returns its result or raises its exception."""
        if threading.current_thread() is self._thread:
            return fn(*args)  # a call from a call: queueing it would wait on itself
        done: Future = Future()
        self._calls.put((fn, args, done))
        return done.result()

    def close(self) -> None:
        """Lets the thread finish the calls queued so far and end."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, done = call
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # handed to the caller, who raises it
                done.set_exception(e)
