"""TLS and mutual TLS on every gRPC hop, set once per process.

Each process has one identity: a certificate and its key (PEM files), and optionally the CA that
signed its peers. A server with a certificate speaks TLS only; with a CA as well it also demands
and checks a client certificate signed by that CA (mutual TLS), so the internal hops
(scheduler -> executor, router -> scheduler) refuse plaintext and strangers alike. A client with
a CA checks the server's certificate against it and presents its own. `--tls-cert`, `--tls-key`
and `--tls-ca` on every command set the variables below for the process (and `serve` hands them
to its children), so every channel and port it opens follows them without threading them
through each constructor. PAGEDSERVE_TLS_SERVER_NAME names the server a client expects when the
address does not; over a unix socket (which names no host) a client expects "localhost".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from pagedserve.protos import grpc_options

CERT_ENV, KEY_ENV, CA_ENV = "PAGEDSERVE_TLS_CERT", "PAGEDSERVE_TLS_KEY", "PAGEDSERVE_TLS_CA"
SERVER_NAME_ENV = "PAGEDSERVE_TLS_SERVER_NAME"


@dataclass(frozen=True)
class TLSConfig:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls) -> TLSConfig:
        cert, key, ca = (os.environ.get(name) for name in (CERT_ENV, KEY_ENV, CA_ENV))
        if bool(cert) != bool(key):
            raise ValueError("tls: --tls-cert and --tls-key go together")
        return cls(*(Path(p).read_bytes() if p else None for p in (cert, key, ca)),
                   server_name=os.environ.get(SERVER_NAME_ENV) or None)

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None


def set_env(cert: str | None, key: str | None, ca: str | None) -> None:
    """The command line's TLS files, for this process and the children it starts; each file is
    read now, so a wrong path is an error at start (ValueError naming the flag)."""
    for flag, env, path in (("--tls-cert", CERT_ENV, cert), ("--tls-key", KEY_ENV, key),
                            ("--tls-ca", CA_ENV, ca)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise ValueError(f"{flag}: no such file {path!r}")
        os.environ[env] = str(Path(path).resolve())
    TLSConfig.from_env()  # the pairing check


def add_port(server: grpc.Server | grpc.aio.Server, address: str, *,
             client_auth: bool = True) -> int:
    """Bind address, with TLS when the process has a certificate (client certificates demanded
    when it also has a CA and client_auth: the public API passes False). Returns the port."""
    tls = TLSConfig.from_env()
    if tls.cert is None:
        return server.add_insecure_port(address)
    creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                        require_client_auth=client_auth and tls.ca is not None)
    return server.add_secure_port(address, creds)


def _secure(tls: TLSConfig, address: str,
            options: list) -> tuple[grpc.ChannelCredentials, list]:
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                         certificate_chain=tls.cert)
    name = tls.server_name or ("localhost" if address.startswith("unix:") else None)
    if name:
        options = [*options, (grpc_options.SSL_TARGET_NAME_OVERRIDE, name)]
    return creds, options


def channel(address: str, options: list | None = None) -> grpc.Channel:
    """A blocking channel to address, with TLS when the process has a CA or certificate."""
    tls, options = TLSConfig.from_env(), list(options or [])
    if not tls.enabled:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, *_secure(tls, address, options))


def aio_channel(address: str, options: list | None = None) -> grpc.aio.Channel:
    """channel's asyncio twin."""
    tls, options = TLSConfig.from_env(), list(options or [])
    if not tls.enabled:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, *_secure(tls, address, options))
