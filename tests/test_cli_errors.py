"""`gfaas` subcommands given bad input, or a platform that cannot answer: a message
on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from gfaas import cli
from shared import auth
from shared.natsd import NatsServer, free_port
from tests.platform import PYTHON, REPO, auth_nats_server, subprocess_env


def gfaas_cli(*args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`gfaas ARGS` in a process of its own (its stderr as a user sees it, nats-py's
    logging included), and how long it took."""
    started = time.monotonic()
    done = subprocess.run(
        [PYTHON, "-m", "gfaas", *args],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    return done, time.monotonic() - started


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


@pytest.mark.unit
def test_a_command_with_no_nats_server_there_says_so_at_once_in_one_line() -> None:
    # nats-py tried the server 61 times, 2 s apart, each try's traceback logged by
    # its default error callback: `gfaas ls` with no platform up took two minutes and
    # some 1,500 lines to say that it could not reach NATS.
    url = f"nats://127.0.0.1:{free_port()}"
    done, took = gfaas_cli("ls", "--nats-url", url, GFAAS_NATS_CREDS="")
    assert done.returncode == 2, done
    said = f"gfaas: cannot reach NATS at {url}: nats: no servers available for connection\n"
    assert done.stderr == said
    assert took < 10, took


@pytest.mark.nats
def test_a_command_whose_credentials_are_refused_says_so_in_one_line(tmp_path: Path) -> None:
    # Refused at once before too, but with two tracebacks from nats-py's logging first.
    with auth_nats_server(tmp_path) as server:
        forged = tmp_path / "forged.json"
        auth.Credentials("admin", "not-the-password").dump(forged)
        done, took = gfaas_cli("ls", "--nats-url", server.url, GFAAS_NATS_CREDS=str(forged))
    assert done.returncode == 2, done
    assert done.stderr == (
        f"gfaas: NATS at {server.url} refused the connection (credentials {forged}): "
        "nats: 'Authorization Violation'\n"
    )
    assert took < 10, took


@pytest.mark.unit
def test_gfaas_status_of_a_misspelt_service_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # It asked the bus for `gfaas.v1.status.schedular`, nobody answered, and it
    # printed "schedular  -  0s  no answer" and exited 0: the service looked down.
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["status", "scheduler", "schedular"])
    assert exited.value.code == 2
    assert "'schedular' is no service (one of ingress, scheduler" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["status"]).services == []
    parsed = cli.build_parser().parse_args(["status", "gpu-worker", "memory-broker"])
    assert parsed.services == ["gpu-worker", "memory-broker"]


@pytest.mark.unit
@pytest.mark.parametrize("command", ["_logs", "_top", "_invoke"])
def test_ctrl_c_ends_a_command_with_130_and_no_traceback(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `gfaas logs --follow` and `gfaas top` end with Ctrl-C, and any command may be
    # interrupted: each ended in a KeyboardInterrupt traceback of wherever its event
    # loop was.
    async def interrupted(*_args: object, **_kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, command, interrupted)
    argv = {
        "_logs": ["logs", "noop", "--follow"],
        "_top": ["top"],
        "_invoke": ["invoke", "noop", "-i", "x=[1]"],
    }[command]
    try:
        code = cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped gfaas's main")
    assert code == 130
    assert capsys.readouterr().err == ""


@pytest.mark.nats
def test_a_command_with_no_credentials_says_where_it_looked_and_what_to_set(
    tmp_path: Path,
) -> None:
    # After `gfaas up --state-dir DIR`, `gfaas ls` found no admin credentials (it
    # looks in .gfaas/auth) and said only "refused the connection (no credentials)".
    with auth_nats_server(tmp_path / "up") as server:
        done, _ = gfaas_cli(
            "ls", "--nats-url", server.url, GFAAS_NATS_CREDS="", GFAAS_STATE_DIR=str(tmp_path)
        )
    assert done.returncode == 2, done
    assert done.stderr == (
        f"gfaas: NATS at {server.url} refused the connection (no credentials: none at "
        f"{tmp_path}/auth/admin.json; set GFAAS_STATE_DIR to the --state-dir `gfaas up` "
        "ran with, or GFAAS_NATS_CREDS=FILE): nats: 'Authorization Violation'\n"
    )


@pytest.mark.unit
def test_an_input_that_cannot_be_read_says_which_and_gives_no_unsafe_advice(
    tmp_path: Path,
) -> None:
    # With several -i, "Expecting ',' delimiter: line 1 column 5" did not say which
    # input; a file that is no .npy came with numpy's advice to load it with pickle.
    with pytest.raises(ValueError, match=r"^input x: '\[1,2' is no JSON array: Expecting"):
        cli.parse_input("x=[1,2")
    with pytest.raises(ValueError, match=r"^input y: could not convert string to float"):
        cli.parse_input('y=["a"]')
    with pytest.raises(ValueError, match=r"^input z: setting an array element"):
        cli.parse_input("z=[1,[2]]")
    text = tmp_path / "not.npy"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=r"is no \.npy file") as raised:
        cli.parse_input(f"x=@{text}")
    assert str(raised.value) == f"input x: {text} is no .npy file of numbers"


@pytest.mark.unit
def test_an_input_given_twice_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # `-i x=[1,2,3] -i x=[4]` invoked with x=[4], the first dropped without a word.
    url = f"nats://127.0.0.1:{free_port()}"  # refused before it would connect
    assert cli.main(["invoke", "noop", "-i", "x=[1,2,3]", "-i", "x=[4]", "--nats-url", url]) == 2
    assert capsys.readouterr().err == "gfaas: input x is given twice\n"
    assert list(cli.parse_inputs(["x=[1]", "y=[2]"])) == ["x", "y"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["up", "--nats-port", "99999"], "'99999' is no TCP port (-1..65535)"),
        (["up", "--http-port", "70000"], "'70000' is no TCP port (0..65535)"),
        (["up", "--http-port", "-5"], "'-5' is no TCP port (0..65535)"),
        (["demo", "--nats-port", "-2"], "'-2' is no TCP port (-1..65535)"),
        (["serve", "ingress", "--http-port", "65536"], "'65536' is no TCP port"),
        (["up", "--workers", "-1"], "'-1' is negative"),
        (["up", "--replicas", "0"], "'0' is not 1 or more"),
    ],
)
def test_up_flags_out_of_range_are_usage_errors(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A port over 65535 ended `gfaas up` in an OverflowError traceback from its port
    # check; --http-port -5 crashed ingress while starting; --workers -1 ran a
    # platform with no worker and --replicas 0 one replica, both said ready.
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.unit
def test_a_port_from_the_environment_over_65535_is_one_line() -> None:
    from gfaas.supervisor import PortInUse, check_ports

    with pytest.raises(PortInUse, match=r"port 99999 \(ingress gRPC\) is no TCP port"):
        check_ports([("ingress gRPC", "127.0.0.1", 99999)])


@pytest.mark.unit
def test_a_metrics_port_in_use_says_how_to_move_the_metrics_ports() -> None:
    # A second `gfaas up` on ports of its own met the first one's metrics ports (fixed,
    # 8002 to 8005, with no flag), told only to "choose another port".
    from gfaas.supervisor import PortInUse, check_ports

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(PortInUse) as raised:
            check_ports([("scheduler metrics", "127.0.0.1", port)])
        assert str(raised.value).endswith(
            "choose another port (GFAAS_METRICS_PORT=N: the metrics ports from N up; 0: any "
            "free ones)"
        )
        with pytest.raises(PortInUse) as raised:
            check_ports([("ingress HTTP", "127.0.0.1", port)])
        assert str(raised.value).endswith("choose another port")
