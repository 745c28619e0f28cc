"""`gfaas up` as a user runs it: real processes, CLI commands, clean stop, kept state."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import anyio
import nats
import psutil
import pytest

from gfaas.client import Client
from tests.platform import PYTHON, REPO, subprocess_env
from tests.specs import ADD_ONE_TOML

pytestmark = [pytest.mark.nats, pytest.mark.slow]


def gfaas(*args: str, env: dict[str, str], timeout: float = 60) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "gfaas", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def start_up(state: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "gfaas",
            "up",
            "--nats-port",
            "-1",
            "--state-dir",
            str(state),
            "--http-port",
            "0",
            "--workers",
            "1",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"NATS (nats://\S+),", line)
    assert match, line
    return proc, match.group(1)


def wait_until_invocable(url: str, env: dict[str, str]) -> str:
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(
            [
                PYTHON,
                "-m",
                "gfaas",
                "invoke",
                "add-one",
                "-i",
                "x=[1,2]",
                "--nats-url",
                url,
                "--timeout",
                "5",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        if done.returncode == 0:
            return done.stdout
        assert time.monotonic() < deadline, done.stderr
        time.sleep(0.5)


def test_up_runs_the_platform_and_sigterm_stops_everything(tmp_path: Path) -> None:
    env = subprocess_env(GFAAS_HEARTBEAT_S="0.2")
    spec = tmp_path / "add-one.toml"
    spec.write_text(ADD_ONE_TOML)
    proc, url = start_up(tmp_path / "state", env)
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for module in (
            "services.ingress",
            "services.scheduler",
            "services.gpu_worker",
            "services.memory_broker",
            "nats-server",
        ):
            assert module in names
        assert "deployed add-one" in gfaas("deploy", str(spec), "--nats-url", url, env=env)
        out = wait_until_invocable(url, env)
        assert "[2. 3.]" in out
        assert "add-one" in gfaas("ls", "--nats-url", url, env=env)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0
    time.sleep(0.2)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], "no orphan processes after SIGTERM"

    # State survives a restart: the registry lives in JetStream on disk.
    proc, url = start_up(tmp_path / "state", env)
    try:
        assert "add-one" in gfaas("ls", "--nats-url", url, env=env)
    finally:
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def test_demo_deploys_and_invokes_every_example(tmp_path: Path) -> None:
    from tests.platform import free_port

    out = gfaas(
        "demo",
        "--state-dir",
        str(tmp_path / "state"),
        "--http-port",
        str(free_port()),
        env=subprocess_env(),
        timeout=240,
    )
    assert "deployed: noop, text-encoder, classifier, preprocess, topk" in out
    assert re.search(r"warm: preprocess .* classifier .* topk", out)
    assert "same top-5 as step by step: True" in out
    assert "cosine similarity" in out
    assert "POST /v2/models/topk/infer -> classes [" in out
    assert "demo finished" in out


def test_ctrl_c_stops_the_demo_while_it_runs(tmp_path: Path) -> None:
    from tests.platform import free_port

    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "gfaas",
            "demo",
            "--nats-port",
            "-1",
            "--state-dir",
            str(tmp_path / "state"),
            "--http-port",
            str(free_port()),
            "--workers",
            "1",
        ],
        env=subprocess_env(GFAAS_GRPC_PORT="0", GFAAS_METRICS_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("1. model weights"), line  # the demo is under way
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        # Not once the whole demo has run: the signal was only looked at after it.
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "demo finished" not in out, out
    assert proc.returncode == 1
    assert "Traceback" not in err, err
    time.sleep(0.2)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], "no orphan processes after Ctrl-C"


def test_up_with_replicas_keeps_scheduling_when_the_active_scheduler_is_killed(
    tmp_path: Path,
) -> None:
    env = subprocess_env(GFAAS_HEARTBEAT_S="0.2")
    spec = tmp_path / "add-one.toml"
    spec.write_text(ADD_ONE_TOML)
    proc, url = start_up(tmp_path / "state", env, "--replicas", "2")
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in children]
        assert sum("services.scheduler" in c for c in commands) == 2
        assert sum("services.ingress" in c for c in commands) == 2
        gfaas("deploy", str(spec), "--nats-url", url, env=env)
        assert "[2. 3.]" in wait_until_invocable(url, env)
        active = active_schedulers(url, env)
        assert len(active) == 1, active
        os.kill(active[0], signal.SIGKILL)
        # The standby takes the lease (or the restarted one does) and work goes on.
        deadline = time.monotonic() + 20
        while not (now := active_schedulers(url, env)) or now == active:
            assert time.monotonic() < deadline, now
            time.sleep(0.3)
        assert "[2. 3.]" in wait_until_invocable(url, env)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def active_schedulers(url: str, env: dict[str, str]) -> list[int]:
    """The pids of the schedulers that say they are active (an instance is named
    host-pid-suffix)."""

    async def ask() -> list[int]:
        nc = await nats.connect(url)
        try:
            found = await Client(nc).statuses("scheduler", expect=2, timeout=2)
        finally:
            await nc.close()
        return [int(i.rsplit("-", 2)[-2]) for i, d in found.items() if d.get("active")]

    return anyio.run(ask)
