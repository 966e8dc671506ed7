"""Health probes: grpc.health.v1 Check on a gRPC address, GET on an HTTP URL.

Used by the `serve` supervisor and by `pagedserve healthcheck` (container health checks).
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.protos import tls


def grpc_serving(address: str, service: str = "", timeout: float = 1.0) -> bool:
    """True when `address` (unix:///path or host:port) answers SERVING for `service`."""
    with tls.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when GET `url` answers 2xx."""
    ca = tls.TLSConfig.from_env().ca
    context = ssl.create_default_context(cadata=ca.decode()) if ca else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def probe(target: str, service: str = "", timeout: float = 1.0) -> bool:
    """An http(s):// target gets GET, anything else a gRPC health Check."""
    if target.startswith(("http://", "https://")):
        return http_ok(target, timeout)
    return grpc_serving(target, service, timeout)
