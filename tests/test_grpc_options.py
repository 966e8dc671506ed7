"""Every gRPC option name pagedserve sets is one gRPC knows, and all of them live in
protos/grpc_options.py.

gRPC ignores an unknown option name without a word (issue 27: a misspelt ping-policy name let the
executor GOAWAY an idle scheduler). grpcio ships no C headers, so the names gRPC knows are read
from the strings of its compiled core (cygrpc), which holds each GRPC_ARG_* value it looks up.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import grpc._cython.cygrpc as cygrpc
import pytest

from pagedserve.protos import grpc_options

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("router", "scheduler", "executor", "kernels", "protos", "pagedserve", "bench")
OPTION_LITERAL = re.compile(r"""["'](grpc\.[a-z0-9_.]+)["']""")  # service names have capitals


@functools.cache
def _core_strings() -> bytes:
    return Path(cygrpc.__file__).read_bytes()


def grpc_knows(name: str) -> bool:
    """Whether gRPC core holds `name` as a whole string (not just a prefix of a longer one)."""
    return re.search(re.escape(name).encode() + rb"(?![a-z0-9_.])", _core_strings()) is not None


def option_literals() -> dict[str, list[str]]:
    """Every 'grpc.xxx' string literal in the source: name -> files that hold it."""
    found: dict[str, list[str]] = {}
    for part in SOURCE_DIRS:
        for path in sorted((ROOT / part).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for name in OPTION_LITERAL.findall(path.read_text()):
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_the_check_tells_known_from_unknown_names() -> None:
    assert grpc_knows("grpc.max_receive_message_length")
    assert grpc_knows("grpc.http2.min_ping_interval_without_data_ms")
    assert not grpc_knows("grpc.http2.min_recv_ping_interval_without_data_ms")  # the old typo
    assert not grpc_knows("grpc.keepalive_time")  # a prefix of a known name is not one


def test_every_option_name_in_the_source_is_known_to_grpc() -> None:
    found = option_literals()
    assert len(found) >= 10, found  # the scan sees grpc_options.py
    unknown = {name: files for name, files in found.items() if not grpc_knows(name)}
    assert not unknown, f"gRPC ignores these option names: {unknown}"


def test_options_are_set_in_grpc_options_only() -> None:
    elsewhere = {name: files for name, files in option_literals().items()
                 if files != ["protos/grpc_options.py"]}
    assert not elsewhere, f"set gRPC options in protos/grpc_options.py: {elsewhere}"


def _built_option_lists() -> list[list[tuple[str, int]]]:
    from pagedserve.executor import server as executor_server
    from pagedserve.scheduler import executor_client
    from pagedserve.scheduler import server as scheduler_server

    return [executor_server.server_options(), scheduler_server.server_options(),
            executor_client.channel_options(), list(grpc_options.SCHEDULER_CHANNEL.items())]


@pytest.mark.parametrize("index", range(4))
def test_the_lists_servers_and_channels_get_are_known_to_grpc(index: int) -> None:
    options = _built_option_lists()[index]
    assert options and all(grpc_knows(name) for name, _ in options), options
    assert len({name for name, _ in options}) == len(options), "an option set twice"


def test_ping_policy_admits_the_schedulers_keepalive() -> None:
    server = dict(grpc_options.SERVER)
    client = dict(grpc_options.EXECUTOR_CHANNEL)
    assert server[grpc_options.MIN_PING_INTERVAL] < client[grpc_options.KEEPALIVE_TIME]
