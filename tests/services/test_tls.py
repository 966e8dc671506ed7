"""TLS on every hop (protos/tls.py): executor and scheduler demand client certificates signed by
the deployment's CA (mutual TLS) and refuse plaintext; the router speaks HTTPS and TLS gRPC; the
API key gates /metrics unless --metrics-public. Certificates are made here with openssl."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ROOT
from tests.e2e.conftest import free_port
from tests.services.conftest import Service, executor_argv, scheduler_argv

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca_and_leaf(d: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signed for localhost / 127.0.0.1, server and client use."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-ca.key",
             "-out", f"{name}-ca.pem", "-days", "2", "-subj", f"/CN={name} test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                           "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.pem", "-CAkey",
             f"{name}-ca.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", "ext", cwd=d)
    return d / f"{name}-ca.pem", d / f"{name}.pem", d / f"{name}.key"


def _health(address: str, creds: grpc.ChannelCredentials | None) -> str:
    """SERVING, NOT_SERVING, or the gRPC error code's name."""
    channel = (grpc.secure_channel(address, creds) if creds is not None
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_every_hop_speaks_tls_and_internal_ones_demand_client_certificates(
        llama_dir: Path, tmp_path: Path) -> None:
    ca, cert, key = _ca_and_leaf(tmp_path, "ours")
    _, stranger_cert, stranger_key = _ca_and_leaf(tmp_path, "stranger")
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
    executor_address, scheduler_address = (f"127.0.0.1:{free_port()}" for _ in range(2))
    port = free_port()
    services = []
    try:
        services.append(Service("executor", [*executor_argv(llama_dir, executor_address), *flags],
                                tmp_path))
        services.append(Service("scheduler", [*scheduler_argv(executor_address,
                                                              scheduler_address), *flags],
                                tmp_path))
        services.append(Service("router", ["router", "--scheduler", scheduler_address, "--model",
                                           str(llama_dir), "--port", str(port), "--grpc-port",
                                           "-1", "--api-key", "k", "--metrics-public", *flags],
                                tmp_path))
        ours = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
        deadline = time.monotonic() + 120
        while _health(scheduler_address, ours) != "SERVING":
            assert time.monotonic() < deadline, [s.log() for s in services]
            time.sleep(0.3)
        assert _health(executor_address, ours) == "SERVING"
        stranger = grpc.ssl_channel_credentials(ca.read_bytes(), stranger_key.read_bytes(),
                                                stranger_cert.read_bytes())
        no_cert = grpc.ssl_channel_credentials(ca.read_bytes())
        for address in (executor_address, scheduler_address):
            assert _health(address, None) == "UNAVAILABLE"  # plaintext is refused
            assert _health(address, no_cert) == "UNAVAILABLE"  # so is TLS without a certificate
            assert _health(address, stranger) == "UNAVAILABLE"  # and one from another CA

        https = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=60)
        base = f"https://127.0.0.1:{port}"
        while True:
            try:
                if https.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, services[-1].log()
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", http_client=https,
                               max_retries=0)
        out = client.completions.create(model="", prompt="Hello", max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason == "length"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # no plaintext HTTP
        assert https.get(f"{base}/metrics").status_code == 200  # --metrics-public
        assert https.get(f"{base}/v1/models").status_code == 401  # the rest wants the key
    finally:
        for service in services:
            service.kill()


def test_a_missing_tls_file_is_refused_at_start(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "pagedserve.cli", "scheduler", "--tls-cert", str(tmp_path / "nope.pem"),
                          "--tls-key", str(tmp_path / "nope.key")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2 and "--tls-cert: no such file" in run.stderr, run.stderr



def test_serve_hands_tls_to_its_children_and_probes_them_over_it(llama_dir: Path,
                                                                  tmp_path: Path) -> None:
    """`serve --tls-*`: its health probes speak mutual TLS to executor and scheduler and HTTPS
    to the router (else it would never report ready)."""
    ca, cert, key = _ca_and_leaf(tmp_path, "ours")
    port = free_port()
    serve = Service("serve", ["serve", str(llama_dir), "--port", str(port), "--grpc-port", "-1",
                              "--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len",
                              "256", "--drain-timeout",
                              "2", "--tls-cert", str(cert), "--tls-key", str(key),
                              "--tls-ca", str(ca)], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while "pagedserve is ready" not in serve.log():
            assert serve.proc.poll() is None and time.monotonic() < deadline, serve.log()
            time.sleep(0.3)
        https = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=60)
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="x",
                               http_client=https, max_retries=0)
        out = client.chat.completions.create(model="", max_tokens=3, temperature=0,
                                             messages=[{"role": "user", "content": "Hi"}])
        assert out.choices[0].finish_reason == "length"
        assert serve.stop() == 0, serve.log()
    finally:
        serve.kill()
