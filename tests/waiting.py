"""Waiting in tests, written once: on a condition with a deadline (a fixed sleep either wastes time
or, on a loaded machine, is too short), and for the port a server bound itself.

Servers that can bind port 0 are given it and report the port they got (the router logs it in its
"router serving" line): picking a free port, closing it and passing the number on lets another
process take the port in between.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")
POLL_S = 0.02  # between looks at the condition: short next to any deadline used here


def wait_until(condition: Callable[[], T], timeout: float = 10.0, what: str = "the condition", *,
               proc: subprocess.Popen | None = None,
               log: Callable[[], str] | None = None) -> T:
    """condition()'s first truthy value; fails naming `what` after `timeout` seconds, or at once
    when `proc` exits first (with the tail of log(), when given)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{log() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s\n{log() if log else ''}")
        time.sleep(POLL_S)
    return value


async def wait_until_async(condition: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """wait_until for a coroutine condition, inside an event loop."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(POLL_S)
    return value


def logged_event(log_path: Path, event: str) -> dict | None:
    """The first JSON log line of this event in the file, or None yet."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                return record
    return None


def router_ports(proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> tuple[int, int | None]:
    """The HTTP and gRPC ports (None: gRPC off) that a `pagedserve router` started with
    `--port 0 --grpc-port 0` bound, from its "router serving" line (logged at level info)."""
    line = wait_until(lambda: logged_event(log_path, "router serving"), timeout,
                      "the router's serving line", proc=proc,
                      log=lambda: log_path.read_text(errors="replace")[-4000:])
    grpc = line.get("grpc")
    return int(line["http"].rsplit(":", 1)[1]), int(grpc.rsplit(":", 1)[1]) if grpc else None
