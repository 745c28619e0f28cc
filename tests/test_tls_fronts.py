"""HTTP and gRPC over TLS (issue 10: "TLS is available by configuration"): with
GFAAS_HTTP_TLS_CERT and GFAAS_HTTP_TLS_KEY, ingress serves https and gRPC over TLS
only; a client that trusts the CA gets in (health open, inference with an API key),
a plain one and one that does not trust the CA do not. A certificate or key that
cannot be used stops ingress at start, naming the setting and the path."""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.ingress.app import serve as serve_ingress
from services.ingress.tls import FrontTLSError, front_tls
from shared import auth
from shared.config import Settings
from tests.helpers import deploy_and_wait
from tests.platform import PYTHON, REPO, Platform, auth_nats_server, auth_platform_at
from tests.platform import subprocess_env as base_env
from tests.specs import ECHO
from tests.test_auth import connect, infer_body
from tests.test_tls import make_certificates

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
    reason="needs openssl to make certificates",
)


@dataclass
class Fronts:
    platform: Platform
    ca: Path
    key: str  # acme's API key


@pytest.fixture
def fronts(tmp_path: Path) -> Iterator[Fronts]:
    """A platform with authentication on, its fronts over TLS with a certificate for
    127.0.0.1 from a test CA; echo deployed."""
    ca, cert, key = make_certificates(tmp_path / "tls")
    state_dir = tmp_path / "state"
    auth_dir = state_dir / "auth"
    auth.ensure(auth_dir)
    api_key = auth.add_tenant(auth_dir, "acme")[1]
    with (
        auth_nats_server(state_dir) as server,
        auth_platform_at(
            server.url,
            state_dir / "services",
            auth_dir,
            http_tls_cert=str(cert),
            http_tls_key=str(key),
        ) as p,
    ):

        async def deploy() -> None:
            nc = await connect(server.url, auth_dir / "admin.json")
            try:
                await deploy_and_wait(nc, ECHO, timeout=30)
            finally:
                await nc.drain()

        anyio.run(deploy)
        yield Fronts(p, ca, api_key)


@pytest.mark.slow
@pytest.mark.nats
@pytest.mark.anyio
async def test_https_serves_those_who_trust_the_ca_and_refuses_plain_http(fronts: Fronts) -> None:
    port = fronts.platform.http_port
    trusted = ssl.create_default_context(cafile=str(fronts.ca))
    acme = {"Authorization": f"Bearer {fronts.key}"}
    async with httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{port}", verify=trusted, timeout=30
    ) as http:
        with anyio.fail_after(30):
            while True:
                try:
                    if (await http.get("/v2/health/ready")).status_code == 200:
                        break
                except httpx.ConnectError:  # not listening yet
                    pass
                await anyio.sleep(0.05)
        assert (await http.get("/v2")).status_code == 401  # TLS is no key
        ok = await http.post("/v2/models/echo/infer", headers=acme, json=infer_body())
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"][0]["data"] == [1, 2, 3]
    # Plain HTTP to the same port: no answer (its handshake fails), let alone a 200.
    async with httpx.AsyncClient(timeout=10) as plain:
        with pytest.raises(httpx.TransportError):
            await plain.get(f"http://127.0.0.1:{port}/v2/health/ready")
    # TLS without trusting the CA (the system's CAs only): the certificate is refused.
    async with httpx.AsyncClient(verify=ssl.create_default_context(), timeout=10) as untrusting:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.get(f"https://127.0.0.1:{port}/v2/health/ready")


@pytest.mark.slow
@pytest.mark.nats
def test_grpc_over_tls_serves_those_who_trust_the_ca_and_refuses_the_others(
    fronts: Fronts,
) -> None:
    url = f"127.0.0.1:{fronts.platform.grpc_port}"
    client = triton.InferenceServerClient(url=url, ssl=True, root_certificates=str(fronts.ca))
    try:
        deadline = time.monotonic() + 30
        while not client.is_server_ready(client_timeout=5):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        x = triton.InferInput("x", [3], "FP32")
        x.set_data_from_numpy(np.arange(3, dtype=np.float32))
        key = {"authorization": f"Bearer {fronts.key}"}
        assert client.infer("echo", [x], headers=key).as_numpy("y").tolist() == [0.0, 1.0, 2.0]
    finally:
        client.close()
    # A plain channel, and a TLS one trusting only the system's CAs: neither gets in.
    for options in ({"ssl": False}, {"ssl": True}):
        other = triton.InferenceServerClient(url=url, **options)
        try:
            with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
                other.is_server_live(client_timeout=5)
        finally:
            other.close()


@pytest.mark.unit
def test_a_front_certificate_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls")
    assert front_tls(Settings()) is None
    sound = front_tls(Settings(http_tls_cert=str(cert), http_tls_key=str(key)))
    assert sound is not None
    assert sound.cert == cert.read_bytes()
    missing = tmp_path / "no-such.pem"
    cases = [
        (Settings(http_tls_cert=str(missing), http_tls_key=str(key)),
         f"GFAAS_HTTP_TLS_CERT={missing}: cannot read it: No such file or directory"),
        (Settings(http_tls_cert=str(cert), http_tls_key=str(tmp_path / "tls")),
         f"GFAAS_HTTP_TLS_KEY={tmp_path / 'tls'}: cannot read it: Is a directory"),
        (Settings(http_tls_cert=str(cert)),
         "GFAAS_HTTP_TLS_CERT is set but GFAAS_HTTP_TLS_KEY is not"),
        (Settings(http_tls_key=str(key)),
         "GFAAS_HTTP_TLS_KEY is set but GFAAS_HTTP_TLS_CERT is not"),
        # The CA's certificate with the server's key: not a pair.
        (Settings(http_tls_cert=str(ca), http_tls_key=str(key)),
         f"GFAAS_HTTP_TLS_CERT={ca} and GFAAS_HTTP_TLS_KEY={key} are not a PEM certificate"),
    ]  # fmt: skip
    for settings, reason in cases:
        with pytest.raises(FrontTLSError) as refused:
            front_tls(settings)
        assert str(refused.value).startswith(reason), reason


@pytest.mark.anyio
async def test_ingress_with_an_unreadable_certificate_stops_before_it_connects(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "cert.pem"
    settings = Settings(
        nats_url="nats://127.0.0.1:9", http_tls_cert=str(missing), http_tls_key=str(missing)
    )
    with anyio.fail_after(5), pytest.raises(FrontTLSError, match="GFAAS_HTTP_TLS_CERT="):
        await serve_ingress(settings, anyio.Event())
    # As its own process: it exits with the reason, and never tried NATS.
    env = base_env(
        GFAAS_HTTP_TLS_CERT=str(missing),
        GFAAS_HTTP_TLS_KEY=str(missing),
        GFAAS_NATS_URL="nats://127.0.0.1:9",
        GFAAS_METRICS_ENABLED="false",
    )
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [PYTHON, "-m", "services.ingress"], env=env, cwd=REPO, check=False
        )
    stderr = done.stderr.decode()
    assert done.returncode != 0
    reason = f"GFAAS_HTTP_TLS_CERT={missing}: cannot read it: No such file or directory"
    assert f"FrontTLSError: {reason}" in stderr
    assert "cannot reach NATS" not in stderr
