"""`gfaas` subcommands given bad input, or a platform that cannot answer: a message
on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from gfaas import cli
from shared.natsd import NatsServer


@pytest.mark.nats
def test_gfaas_result_without_an_ingress_says_so(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # nats-py's NoRespondersError is no GfaasError: it escaped as a traceback.
    assert cli.main(["result", "abc", "--nats-url", nats_server.url]) == 2
    assert "gfaas: no_worker: no ingress is running" in capsys.readouterr().err
