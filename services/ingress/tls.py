"""TLS for ingress's HTTP and gRPC fronts (issue 10: "TLS is available by configuration").

`GFAAS_HTTP_TLS_CERT` (a PEM certificate, its chain after it) and `GFAAS_HTTP_TLS_KEY`
(its PEM key, unencrypted) together make both fronts serve TLS only: HTTP is https
(uvicorn on its pre-bound socket) and gRPC a secure port. Both files are read, and
checked to be a certificate and its key, as ingress starts, before it connects
anywhere: one missing, unreadable or not matching stops it with the setting and the
path in the message, instead of a front that never answers.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from shared.config import Settings

CERT_ENV = "GFAAS_HTTP_TLS_CERT"
KEY_ENV = "GFAAS_HTTP_TLS_KEY"


class FrontTLSError(ValueError):
    """The fronts' TLS settings cannot be used (the message names the setting and path)."""


@dataclass(frozen=True)
class FrontTLS:
    cert_file: Path
    key_file: Path
    cert: bytes  # PEM: the certificate, then its chain
    key: bytes


def front_tls(settings: Settings) -> FrontTLS | None:
    """The fronts' certificate and key, read and checked, or None when TLS is off.
    Raises FrontTLSError naming what is wrong."""
    cert_file, key_file = settings.http_tls_cert.strip(), settings.http_tls_key.strip()
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        given, missing = (CERT_ENV, KEY_ENV) if cert_file else (KEY_ENV, CERT_ENV)
        raise FrontTLSError(f"{given} is set but {missing} is not: TLS for the fronts needs both")
    cert, key = _read(CERT_ENV, Path(cert_file)), _read(KEY_ENV, Path(key_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback that gives none: an encrypted key fails here instead
        # of OpenSSL asking for its passphrase on the terminal.
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise FrontTLSError(
            f"{CERT_ENV}={cert_file} and {KEY_ENV}={key_file} are not a PEM certificate "
            f"and its unencrypted key: {exc}"
        ) from exc
    return FrontTLS(Path(cert_file).resolve(), Path(key_file).resolve(), cert, key)


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FrontTLSError(f"{setting}={path}: cannot read it: {exc.strerror or exc}") from exc
