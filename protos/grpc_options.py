"""Every gRPC channel and server option pagedserve sets, in one place (constants only).

gRPC ignores an option name it does not know, without a word: a misspelt name silently keeps
gRPC's default. tests/test_grpc_options.py checks every name here against the names the installed
gRPC core knows. Build option lists as `list(SERVER.items())`; a caller that tunes one value does
`{**SERVER, MIN_PING_INTERVAL: ms}`.
"""

from __future__ import annotations

from collections.abc import Mapping

# Option names (gRPC core's GRPC_ARG_*), for the values a caller may tune.
KEEPALIVE_TIME = "grpc.keepalive_time_ms"
# The server's ping policy. Note the name: the C macro is GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_
# WITHOUT_DATA_MS, but its value (what Python must pass) has no "recv" in it.
MIN_PING_INTERVAL = "grpc.http2.min_ping_interval_without_data_ms"

# Environment variables that override the two ping timings (tests shorten them; no flag needed).
KEEPALIVE_TIME_ENV = "PAGEDSERVE_GRPC_KEEPALIVE_TIME_MS"
MIN_PING_INTERVAL_ENV = "PAGEDSERVE_GRPC_MIN_PING_INTERVAL_MS"

# A step plan for a large batch, or a long prompt's ids, passes gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 << 20

# The scheduler pings its executor this often on the Execute stream, to notice a dead peer on TCP
# within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS (unix sockets notice at once anyway).
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
# Our servers accept pings this often without data; below KEEPALIVE_TIME_MS, so the scheduler's
# pings are never "too many" (gRPC's default is 5 minutes: it would GOAWAY the idle scheduler).
MIN_PING_INTERVAL_MS = 5_000
# gRPC's default, stated: a client pinging faster than allowed is cut off at the third strike, so
# a misconfigured client shows up (rather than 0, which would allow any rate and hide it).
MAX_PING_STRIKES = 2

MAX_RECEIVE = "grpc.max_receive_message_length"
# The name a TLS client expects in the server's certificate, when the address does not say it.
SSL_TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"

MESSAGE_SIZE: Mapping[str, int] = {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    MAX_RECEIVE: MAX_MESSAGE_BYTES,
}

# The internal servers (scheduler, executor).
SERVER: Mapping[str, int] = {
    **MESSAGE_SIZE,
    "grpc.keepalive_permit_without_calls": 1,  # accept pings while no call is open, too
    MIN_PING_INTERVAL: MIN_PING_INTERVAL_MS,
    "grpc.http2.max_ping_strikes": MAX_PING_STRIKES,
    "grpc.so_reuseport": 0,  # a second server on a taken port fails to bind instead of sharing it
}

# The router's public gRPC server: any client. A request is bounded as the HTTP API bounds its
# body (4 MiB, --max-request-body-bytes' default), and one connection may hold PUBLIC_MAX_STREAMS
# calls at once (more wait for a free one, as HTTP/2 says), so one client cannot pin the router.
PUBLIC_MAX_REQUEST_BYTES = 4 << 20
PUBLIC_MAX_STREAMS = 128
PUBLIC_SERVER: Mapping[str, int] = {
    **SERVER,
    MAX_RECEIVE: PUBLIC_MAX_REQUEST_BYTES,
    "grpc.max_concurrent_streams": PUBLIC_MAX_STREAMS,
}

# The scheduler's channel to its executor.
EXECUTOR_CHANNEL: Mapping[str, int] = {
    **MESSAGE_SIZE,
    # Reconnect within half a second of an executor coming back (gRPC's default backs off to 2 min).
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
    KEEPALIVE_TIME: KEEPALIVE_TIME_MS,
    "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
    # Keep pinging an idle stream: gRPC's default (2) stops keepalive after two pings without data,
    # and a dead executor would go unnoticed for minutes.
    "grpc.http2.max_pings_without_data": 0,
}

# The router's channel to its scheduler (the Session stream carries every request's outputs).
SCHEDULER_CHANNEL: Mapping[str, int] = MESSAGE_SIZE
