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


@pytest.mark.unit
@pytest.mark.parametrize(
    "argv",
    [
        ["invoke", "f", "--timeout", "inf"],
        ["invoke", "f", "--timeout", "nan"],
        ["invoke", "f", "--timeout", "-1"],
        ["invoke", "f", "--timeout", "0"],
        ["trace", "x", "--wait", "nan"],
        ["trace", "x", "--wait", "inf"],
        ["trace", "x", "--wait", "-1"],
        ["top", "--interval", "0"],
        ["top", "--interval", "nan"],
    ],
)
def test_a_duration_flag_that_is_no_finite_positive_number_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # `--timeout inf` ended `gfaas invoke` in an OverflowError, `--wait nan` never
    # ended `gfaas trace`. Refused as the flags are parsed, before anything runs.
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert f"'{argv[-1]}': seconds must be" in capsys.readouterr().err


@pytest.mark.unit
def test_duration_flags_take_finite_seconds() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["invoke", "f", "--timeout", "2.5"]).timeout == 2.5
    assert parser.parse_args(["trace", "x", "--wait", "0"]).wait == 0.0
    assert parser.parse_args(["top", "--interval", "0.5"]).interval == 0.5


@pytest.mark.unit
def test_an_input_with_a_dtype_numpy_does_not_know_is_a_value_error() -> None:
    # numpy says so with a TypeError, which `gfaas invoke` let out as a traceback.
    with pytest.raises(ValueError, match="input x: data type 'float99' not understood"):
        cli.parse_input("x=[1, 2]:float99")
    name, value = cli.parse_input("x=[1, 2]:int64")
    assert (name, value.dtype.name, value.tolist()) == ("x", "int64", [1, 2])
