"""A set of scheduler replicas named by DNS: `--scheduler dns:///NAME:PORT`, as a Kubernetes
headless service names its pods. Every address the name resolves to is one replica (router/
replicas.py routes among them); the name is resolved again when a request comes and REFRESH_S
have passed since the last time, so replicas that come and go join and leave the set. A
resolution that fails or finds nothing keeps the set as it was."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

PREFIX = "dns:///"
REFRESH_S = 30.0


def parse(address: str) -> tuple[str, int]:
    """(host, port) of `dns:///HOST:PORT`; ValueError naming --scheduler otherwise."""
    rest = address[len(PREFIX):]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--scheduler: expected dns:///HOST:PORT, got {address!r}")
    return host, int(port)


def _addresses(infos: list, port: int) -> list[str]:
    """gRPC target strings, one per distinct IP, in a stable order."""
    ips = sorted({info[4][0] for info in infos})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"--scheduler: dns:///{host}:{port} does not resolve ({e})") from None
    return _addresses(infos, port)


async def resolve_async(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return _addresses(infos, port)


class DnsRefresh:
    """When the replica set's name is due to be resolved again, and doing it."""

    def __init__(self, host: str, port: int, *,
                 resolver: Callable[[str, int], Awaitable[list[str]]] = resolve_async,
                 every_s: float = REFRESH_S) -> None:
        self.host, self.port, self.resolver, self.every_s = host, port, resolver, every_s
        self.last = time.monotonic()

    async def addresses(self) -> list[str] | None:
        """The name's addresses when a refresh is due and finds some, else None."""
        now = time.monotonic()
        if now - self.last < self.every_s:
            return None
        self.last = now
        try:
            return await self.resolver(self.host, self.port) or None
        except OSError:
            return None
