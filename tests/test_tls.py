"""NATS over TLS (issue 10: "TLS is available by configuration"): `gfaas up` with a
certificate serves tls:// only, every service and the CLI connect through it with the
CA given, and a client that does not speak TLS or does not trust the CA is refused.
Its HTTP front takes the same certificate (GFAAS_HTTP_TLS_*) and serves https; the
fronts over TLS are tested further in tests/test_tls_fronts.py."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import anyio
import httpx
import nats
import numpy as np
import pytest

from gfaas.client import Client
from tests.platform import PYTHON, REPO, free_port, gfaas_up
from tests.platform import subprocess_env as base_env

pytestmark = pytest.mark.slow


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(where: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1: (ca, cert, key)."""
    where.mkdir(parents=True, exist_ok=True)
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=gfaas test CA",
        cwd=where,
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=where,
    )  # fmt: skip
    (where / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
        cwd=where,
    )  # fmt: skip
    return where / "ca.pem", where / "server.pem", where / "server.key"


@pytest.mark.skipif(
    subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
    reason="needs openssl to make certificates",
)
def test_gfaas_up_serves_nats_over_tls_to_those_who_trust_its_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls")
    state = tmp_path / "state"
    env = base_env(
        GFAAS_HEARTBEAT_S="0.2",
        GFAAS_NATS_AUTH="true",
        GFAAS_STATE_DIR=str(state),
        GFAAS_NATS_TLS_CERT=str(cert),
        GFAAS_NATS_TLS_KEY=str(key),
        GFAAS_NATS_TLS_CA=str(ca),
        # HTTP over TLS with the same certificate, passed on to ingress by `gfaas up`.
        GFAAS_HTTP_TLS_CERT=str(cert),
        GFAAS_HTTP_TLS_KEY=str(key),
        GFAAS_HTTP_PORT=str(free_port()),
        GFAAS_GRPC_ENABLED="false",
        GFAAS_METRICS_ENABLED="false",
    )
    env.pop("GFAAS_NATS_URL", None)
    # This process's clients: the admin's credentials in the state directory, the CA.
    monkeypatch.setenv("GFAAS_STATE_DIR", str(state))
    monkeypatch.setenv("GFAAS_NATS_TLS_CA", str(ca))
    spec = tmp_path / "add-one.toml"
    spec.write_text('name = "add-one"\nhandler = "tests.funcs:add_one"\nkind = "cpu"\n')
    with gfaas_up(env) as up:
        assert up.url.startswith("tls://"), up.line
        https = f"https://127.0.0.1:{env['GFAAS_HTTP_PORT']}"
        assert f"HTTP {https}," in up.line
        # The CLI, with the CA from the environment and the admin's credentials.
        done = subprocess.run(
            [PYTHON, "-m", "gfaas", "deploy", str(spec), "--nats-url", up.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        plain_url = up.url.replace("tls://", "nats://")

        async def calls() -> None:
            # Every service connected over TLS: the call goes through all of them.
            with anyio.fail_after(60):
                while True:
                    try:
                        async with Client.connect(up.url) as admin:
                            out = await admin.invoke("add-one", {"x": np.array([1.0])}, timeout=5)
                            break
                    except Exception:
                        await anyio.sleep(0.3)
            assert out["y"].tolist() == [2.0]
            trusted = ssl.create_default_context(cafile=str(ca))
            async with httpx.AsyncClient(verify=trusted, timeout=10) as http:
                ready = await http.get(f"{https}/v2/health/ready")
                assert ready.status_code == 200
            # Not speaking TLS: refused. Speaking it without trusting the CA: refused.
            for options in (
                {"servers": [plain_url], "tls": None},
                {"servers": [up.url], "tls": ssl.create_default_context()},
            ):
                with pytest.raises(Exception):  # noqa: B017,PT011  # nats-py's varied errors
                    await nats.connect(
                        **options,
                        allow_reconnect=False,
                        connect_timeout=3,
                        max_reconnect_attempts=0,
                    )

        anyio.run(calls)
    assert up.code == 0
