"""The platform for tests: gfaas services on a background event loop, stoppable one
by one, and services as their own processes for tests that kill them. Fixtures that
use these are in conftest.py; tests import what they need from here.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from services.gpu_worker.app import serve as serve_worker
from services.ingress.app import serve as serve_ingress
from services.memory_broker.app import serve as serve_broker
from services.scheduler.app import serve as serve_scheduler
from shared import auth
from shared.config import Settings
from shared.natsd import NatsServer, start_nats_server
from shared.natsd import free_port as free_port  # re-exported for the tests
from shared.service import ServeFn

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Platform:
    """Services running on a background event loop, stoppable one by one."""

    portal: BlockingPortal
    url: str
    http_port: int
    state_dir: Path
    grpc_port: int = 0
    stops: dict[str, anyio.Event] = field(default_factory=dict)
    futures: dict[str, Any] = field(default_factory=dict)

    def start(self, name: str, serve: ServeFn, settings: Settings) -> None:
        stop = self.portal.call(anyio.Event)
        future, _ = self.portal.start_task(serve, settings, stop, name=name)
        self.stops[name], self.futures[name] = stop, future

    def stop(self, name: str, timeout: float = 30.0) -> None:
        self.portal.call(self.stops.pop(name).set)
        self.futures.pop(name).result(timeout)

    def stop_all(self) -> None:
        for name in list(self.stops):
            self.stop(name)


def settings_for(url: str, state_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": url,
        "state_dir": state_dir,
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "grpc_port": free_port(),
        # Every service's metrics on a port of its own (shared.metrics); status says which.
        "metrics_port": 0,
        "heartbeat_s": 0.1,
        "worker_timeout_s": 1.0,
        "capacity": 8,
        # Each platform its own shared-memory names: the host tier is node-wide.
        "shm_namespace": f"gfaas-t{secrets.token_hex(4)}",
    }
    values.update(overrides)
    return Settings(**values)


def platform_at(
    url: str, state_dir: Path, *, workers: int = 1, **overrides: Any
) -> AbstractContextManager[Platform]:
    """Every service on a background loop, as one process."""
    return _platform(url, state_dir, workers, None, overrides)


def auth_platform_at(
    url: str, state_dir: Path, auth_dir: Path, *, workers: int = 1, **overrides: Any
) -> AbstractContextManager[Platform]:
    """`platform_at` with authentication on: each service connects as its own NATS
    user, and HTTP and gRPC want API keys from `auth_dir`."""
    return _platform(url, state_dir, workers, auth_dir, overrides)


@contextmanager
def _platform(
    url: str, state_dir: Path, workers: int, auth_dir: Path | None, overrides: dict[str, Any]
) -> Iterator[Platform]:
    settings = settings_for(url, state_dir, **overrides)

    def as_service(s: Settings, service: str) -> Settings:
        return s if auth_dir is None else auth_settings(s, service, auth_dir)

    with start_blocking_portal("asyncio") as portal:
        p = Platform(
            portal=portal,
            url=url,
            http_port=settings.http_port,
            state_dir=state_dir,
            grpc_port=settings.grpc_port,
        )
        try:
            for i in range(workers):
                worker_settings = Settings(**{**settings.__dict__, "worker_id": f"w{i}"})
                p.start(f"worker-{i}", serve_worker, as_service(worker_settings, "gpu-worker"))
            p.start("memory-broker", serve_broker, as_service(settings, "memory-broker"))
            p.start("scheduler", serve_scheduler, as_service(settings, "scheduler"))
            p.start("ingress", serve_ingress, as_service(settings, "ingress"))
            yield p
        finally:
            p.stop_all()


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


PYTHON = sys.executable


@dataclass
class Up:
    """A `gfaas up` process: the NATS URL and the line it said it was ready with,
    and (once it stopped) its exit code."""

    proc: subprocess.Popen[str]
    url: str
    line: str
    code: int | None = None


@contextmanager
def gfaas_up(env: dict[str, str], *args: str) -> Iterator[Up]:
    """`gfaas up` as its own process (an embedded NATS server on a free port, one
    worker, unless `args` say otherwise), until its ready line; SIGTERM after. Its
    services' metrics on free ports unless `env` names them: the fixed ones may be
    another platform's on this host."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "gfaas", "up", "--nats-port", "-1", "--workers", "1", *args],
        env={"GFAAS_METRICS_PORT": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    up: Up | None = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"NATS ((?:nats|tls)://\S+),", line)
        assert match, line
        up = Up(proc, match.group(1), line)
        yield up
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        if proc.stdout is not None:
            proc.stdout.close()
        if up is not None:
            up.code = code


def spawn_worker(nats_url: str, worker_id: str, state_dir: Path) -> subprocess.Popen[bytes]:
    """A worker as its own process (for tests that kill one); the caller kills it."""
    env = subprocess_env(
        GFAAS_NATS_URL=nats_url,
        GFAAS_WORKER_ID=worker_id,
        GFAAS_HEARTBEAT_S="0.1",
        GFAAS_STATE_DIR=str(state_dir),
    )
    return spawn_service("services.gpu_worker", env)


def spawn_service(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A service as its own process (`python -m module`), quiet; the caller ends it."""
    return subprocess.Popen(
        [PYTHON, "-m", module], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@contextmanager
def doomed_platform(
    nats_url: str, tmp_path: Path, worker_id: str = "doomed"
) -> Iterator[tuple[Platform, subprocess.Popen[bytes]]]:
    """A platform whose only worker is its own process, for tests that kill it: at
    first everything lands there. Its heartbeats lapse after 1 s."""
    with platform_at(nats_url, tmp_path / "s", workers=0, worker_timeout_s=1.0) as p:
        proc = spawn_worker(nats_url, worker_id, tmp_path / "w")
        try:
            yield p, proc
        finally:
            proc.kill()
            proc.wait()


# -- authentication on (shared/auth.py): tests/test_auth.py --------------------------------


@contextmanager
def auth_nats_server(state_dir: Path, tenants: tuple[str, ...] = ()) -> Iterator[NatsServer]:
    """A nats-server with gfaas's accounts, users and permissions, as `gfaas up` runs
    it with authentication on: credentials under `state_dir/auth`, `tenants` added
    first (each `state_dir/auth/tenants/<name>.json`; its API key in tokens.json)."""
    directory = state_dir / "auth"
    state = auth.ensure(directory)
    for tenant in tenants:
        auth.add_tenant(directory, tenant)
    auth.write_accounts(auth.AuthState.load(directory), anonymous=False)
    nats_dir = state_dir / "nats"
    server = start_nats_server(
        nats_dir, extra_config=auth.server_config(state, pid_file=nats_dir / "nats-server.pid")
    )
    try:
        yield server
    finally:
        server.stop()


def auth_settings(settings: Settings, service: str, auth_dir: Path) -> Settings:
    """`settings` for one service connecting as its own NATS user."""
    return Settings(
        **{
            **settings.__dict__,
            "nats_auth": True,
            "auth_dir": str(auth_dir),
            "nats_creds": str(auth_dir / f"{service}.json"),
        }
    )
