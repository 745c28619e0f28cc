"""Fixtures: a real nats-server on a free loopback port, and the gfaas services.

Services run in-process on their own event loop thread (fast, and spans land in
one in-memory exporter); tests that need process boundaries (a worker killed
mid-request, `gfaas up`) start real processes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.natsd import NatsCluster, NatsServer
from shared.natsd import nats_cluster as nats_cluster_at
from shared.natsd import nats_server as nats_server_at
from tests.platform import Platform, platform_at

# `gfaas up` authenticates by default; the processes tests start run it as the test
# platform runs, unauthenticated, unless a test asks (tests/test_auth.py does).
os.environ.setdefault("GFAAS_NATS_AUTH", "false")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server_at(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three clustered JetStream nodes; `.url` lists them all, `.nodes[i]` can be
    stopped, killed and started again."""
    with nats_cluster_at(tmp_path / "nats-cluster", 3) as cluster:
        yield cluster


@pytest.fixture
def platform(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(nats_server.url, tmp_path / "state") as p:
        yield p


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    try:
        yield conn
    finally:
        await conn.drain()


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory for a state directory that the handler user (nobody) can pass
    through: pytest's own temporary directories are root's, 0700."""
    path = Path(tempfile.mkdtemp(prefix="gfaas-reach-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The spans this module's tests finish, in memory. The global provider can be
    set once per process: whichever module comes first sets it, the others add
    their exporters to it."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter
