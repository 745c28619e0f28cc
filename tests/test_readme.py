"""The README's commands, run as a newcomer would on a fresh clone.

A ```sh block right after a line starting `<!-- tested` is run, command by command,
against a fresh `gfaas up` (free ports, a temporary state dir), from a directory
that looks like the repository's root; `.venv/bin/gfaas` and `.venv/bin/python`
become this interpreter. Blocks without the mark (installing, `gfaas up` itself,
long-running services) are only read.
"""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess
from pathlib import Path

import anyio
import pytest

from gfaas.client import Client
from gfaas.demo import wait_ready
from tests.platform import PYTHON, REPO, free_port, gfaas_up, subprocess_env

README = REPO / "README.md"
MARK = "<!-- tested"
# Not mirrored into the working directory: state, the environment, git.
PRIVATE = {".gfaas", ".venv", ".git"}


def readme_commands(text: str) -> list[str]:
    """The commands of every ```sh block right after a `<!-- tested` line, in order;
    a line ending in a backslash continues on the next."""
    lines = text.splitlines()
    commands: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip().startswith(MARK):
            continue
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        assert following == "```sh", (
            f"README line {i + 1}: a tested mark must be followed by a ```sh block"
        )
        pending = ""
        for body in lines[i + 2 :]:
            if body.strip() == "```":
                break
            if body.rstrip().endswith("\\"):
                pending += body.rstrip()[:-1] + " "
                continue
            command = (pending + body).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
        else:
            raise AssertionError(f"README line {i + 2}: unterminated ```sh block")
    return commands


def localise(command: str) -> str:
    """`.venv/bin/gfaas` and `.venv/bin/python` as this interpreter."""
    python = shlex.quote(PYTHON)
    command = re.sub(r"(?<![\w/.])\.venv/bin/gfaas\b", f"{python} -m gfaas", command)
    return re.sub(r"(?<![\w/.])\.venv/bin/python\b", python, command)


def test_tested_blocks_are_the_usage_not_the_install() -> None:
    commands = readme_commands(README.read_text())
    assert any(" invoke " in c for c in commands), commands
    assert any(" deploy " in c for c in commands), commands
    for command in commands:
        assert "scripts/" not in command, command
        assert "docker compose" not in command, command
        # The test starts the platform itself, on free ports.
        assert not re.search(r"gfaas (up|serve|demo)\b", command), command
    assert localise(".venv/bin/gfaas ls") == f"{shlex.quote(PYTHON)} -m gfaas ls"


@pytest.mark.parametrize(
    "spec", ["examples/vision/classifier.toml", "examples/workflows/classify-image.toml"]
)
def test_readme_quotes_the_shipped_specs(spec: str) -> None:
    assert (REPO / spec).read_text().strip() in README.read_text()


def _mirror_repo(into: Path) -> Path:
    """A directory whose entries are the repository's (symlinked): paths in the
    README resolve, and what the commands write stays out of the checkout."""
    into.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in PRIVATE:
            (into / entry.name).symlink_to(entry)
    return into


async def _until_ready(url: str) -> None:
    async with Client.connect(url) as client:
        await wait_ready(client, set(), timeout=60)


@pytest.mark.nats
@pytest.mark.slow
def test_readme_commands_run_against_gfaas_up(tmp_path: Path) -> None:
    commands = readme_commands(README.read_text())
    http_port, grpc_port = free_port(), free_port()
    env = subprocess_env(
        GFAAS_GRPC_PORT=str(grpc_port),
        GFAAS_HEARTBEAT_S="0.2",
        GFAAS_SHM_NAMESPACE=f"gfaas-readme{secrets.token_hex(4)}",
    )
    env.pop("GFAAS_NATS_URL", None)
    up_args = ("--http-port", str(http_port), "--state-dir", str(tmp_path / "state"))
    with gfaas_up(env, *up_args) as up:
        line, url = up.line, up.url
        assert "services ready" in line
        assert f"HTTP http://127.0.0.1:{http_port}, gRPC 127.0.0.1:{grpc_port}" in line
        anyio.run(_until_ready, url)

        cwd = _mirror_repo(tmp_path / "clone")
        cli_env = {**env, "GFAAS_NATS_URL": url}
        outputs: dict[str, str] = {}
        for command in commands:
            done = subprocess.run(
                ["bash", "-c", localise(command)],
                env=cli_env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert done.returncode == 0, (
                f"README command failed ({done.returncode}): {command}\n"
                f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            )
            outputs[command] = done.stdout
        noop = next(out for c, out in outputs.items() if " invoke noop " in c)
        assert "[1. 2. 3.]" in noop
    assert up.code == 0
