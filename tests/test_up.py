"""`gfaas up` as a user runs it: "up" only once every service answers, a port in use is
one line and a non-zero exit, and (no collector) the span files `gfaas trace` reads."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.platform import PYTHON, REPO, free_port, gfaas_up, subprocess_env
from tests.specs import ADD_ONE_TOML

pytestmark = [pytest.mark.nats, pytest.mark.slow]


def _env(state: Path) -> dict[str, str]:
    # Every port but the one a test names is any free one: nothing here clashes with
    # another platform on this machine.
    return subprocess_env(
        GFAAS_HEARTBEAT_S="0.2",
        GFAAS_STATE_DIR=str(state),
        GFAAS_GRPC_PORT="0",
        GFAAS_METRICS_PORT="0",
        OTEL_EXPORTER_OTLP_ENDPOINT="",
    )


def gfaas(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "gfaas", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize("command", ["up", "demo"])
def test_a_port_in_use_is_one_line_and_a_failed_start(tmp_path: Path, command: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started = time.monotonic()
        # Unchecked (the demo's, before), ingress was restarted in a loop while the
        # demo waited for it (90 s).
        done = gfaas(
            command,
            "--nats-port",
            "-1",
            "--state-dir",
            str(tmp_path / "state"),
            "--http-port",
            str(port),
            "--workers",
            "1",
            env=_env(tmp_path / "state"),
            timeout=30,
        )
    assert done.returncode == 1
    assert time.monotonic() - started < 30  # no restart loop
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"port {port} (ingress HTTP) is already in use" in lines[0]
    assert "services ready" not in done.stdout
    assert f"port {port} (ingress HTTP) is already in use" in lines[0]
    assert "deployed" not in done.stdout


def test_up_says_ready_once_every_service_answers_and_trace_reads_its_spans(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    env = _env(state)
    with gfaas_up(env, "--state-dir", str(state), "--http-port", str(free_port())) as up:
        line = up.line
        match = re.search(r"gfaas up: (\d+) services ready \(NATS (nats://\S+),", line)
        assert match, line
        assert match.group(1) == "4"
        url = match.group(2)
        # Ready means answering: every service's status is there at once.
        status = gfaas("status", "--nats-url", url, env=env)
        assert status.returncode == 0, status.stderr
        assert "no answer" not in status.stdout, status.stdout
        spec = tmp_path / "add-one.toml"
        spec.write_text(ADD_ONE_TOML)
        deployed = gfaas("deploy", str(spec), "--nats-url", url, env=env)
        assert deployed.returncode == 0, deployed.stderr
        deadline = time.monotonic() + 60
        while True:
            done = gfaas("invoke", "add-one", "-i", "x=[1,2]", "--nats-url", url, env=env)
            if done.returncode == 0:
                break
            assert time.monotonic() < deadline, done.stderr
            time.sleep(0.5)
        assert "[2. 3.]" in done.stdout
        (invocation,) = re.findall(r"^invocation (\S+)$", done.stderr, re.MULTILINE)
        traced = gfaas("trace", invocation, "--wait", "5", env=env)
        assert traced.returncode == 0, traced.stderr
        tree = traced.stdout
        # Each process wrote its own spans; the CLI's call is the root.
        for name in (
            "cli: client invoke add-one",
            "ingress: ingress invoke",
            "gpu-worker: worker run",
        ):
            assert name in tree, tree
        assert list((state / "traces").glob("ingress-*.jsonl"))


def test_up_with_ports_of_0_announces_the_ports_ingress_bound(tmp_path: Path) -> None:
    """`--http-port 0` and GFAAS_GRPC_PORT=0 (any free port) announced `HTTP
    http://127.0.0.1:0` and `gRPC 127.0.0.1:0`: not where anything listens. The ready
    line gives the ports ingress bound, and they answer."""
    import urllib.request

    state = tmp_path / "state"
    with gfaas_up(_env(state), "--state-dir", str(state), "--http-port", "0") as up:
        http = re.search(r"HTTP http://127\.0\.0\.1:(\d+)", up.line)
        grpc = re.search(r"gRPC 127\.0\.0\.1:(\d+)", up.line)
        assert http, up.line
        assert grpc, up.line
        http_port, grpc_port = int(http.group(1)), int(grpc.group(1))
        assert http_port != 0, up.line
        assert grpc_port != 0, up.line
        url = f"http://127.0.0.1:{http_port}/v2/health/live"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.status == 200
        socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()
