"""`gfaas up`: an embedded nats-server plus every service as its own OS process.

Children are started with a parent-death signal, so even a SIGKILLed supervisor
leaves no orphans. A child that crashes is restarted with backoff. SIGINT/SIGTERM
stops the services first (each drains its work), then the NATS server (which
flushes JetStream), so no state is lost.

Before anything starts, the ports the platform binds (NATS, HTTP, gRPC, metrics) are
checked: one already in use is one line (`PortInUse`) and a non-zero exit, not a
child restarted in a loop. `gfaas up` is up once every service answers its status
subject (`wait_ready`); a child that exits before that stops the start (`StartFailed`).
Without an OTLP collector the services write their spans under
`<state_dir>/traces` (shared.tracing, read by `gfaas trace`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared import auth, tracing
from shared.config import DEFAULT_METRICS_PORTS, Settings
from shared.logs import get_logger
from shared.natsd import NatsServer, start_nats_server
from shared.procs import die_with_parent

log = get_logger("supervisor")

SERVICE_MODULES: dict[str, str] = {
    "ingress": "services.ingress",
    "scheduler": "services.scheduler",
    "memory-broker": "services.memory_broker",
    "gpu-worker": "services.gpu_worker",
}
STOP_GRACE_S = 30.0
# The embedded server's pid file, in its state dir: `gfaas tenant add` reloads it.
PID_FILE = "nats-server.pid"
# How long `gfaas up` waits for every service to answer its status subject (workers
# import torch, then connect).
READY_TIMEOUT_S = float(os.environ.get("GFAAS_UP_READY_TIMEOUT_S", "120"))


class PortInUse(Exception):
    """A port the platform would bind is taken (the message is the one line to print)."""


class StartFailed(Exception):
    """The platform did not come up: a child exited while starting, or a service never
    answered (the message is the one line to print)."""


class StateDirInUse(StartFailed):
    """Another `gfaas up` runs on this state directory: a second one started its own
    NATS server on the same JetStream store, rewrote the first's server config and
    pid file (`gfaas tenant add` then signalled a dead or reused pid), and used the
    same shared-memory names, its stop removing the first's segments."""


LOCK_FILE = "up.lock"


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=die_with_parent)
        log.info("child.started", child=self.name, pid=self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


SHM_NAMESPACE_ENV = "GFAAS_SHM_NAMESPACE"


def shm_namespace(settings: Settings) -> str:
    """The platform's prefix of its shared-memory names: GFAAS_SHM_NAMESPACE, else one
    of its state directory's. Every `gfaas up` used "gfaas", so a second platform on
    the host (its own ports and state) took over the first's lease board at start
    and, at its stop, removed the board and the host tier of weights the first was
    using. The same state directory gets the same names: a restarted platform still
    finds what a killed one left."""
    if SHM_NAMESPACE_ENV in os.environ:
        return settings.shm_namespace
    digest = hashlib.sha256(str(settings.state_dir.resolve()).encode()).hexdigest()
    return f"{settings.shm_namespace}-{digest[:8]}"


def service_env(settings: Settings, nats_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GFAAS_NATS_URL": nats_url,
            SHM_NAMESPACE_ENV: shm_namespace(settings),
            "GFAAS_STATE_DIR": str(settings.state_dir),
            "GFAAS_LOG_LEVEL": settings.log_level,
            "GFAAS_HTTP_HOST": settings.http_host,
            "GFAAS_HTTP_PORT": str(settings.http_port),
            "GFAAS_GRPC_PORT": str(settings.grpc_port),
            "GFAAS_GRPC_ENABLED": str(settings.grpc_enabled).lower(),
            "GFAAS_POLICY": settings.policy,
            "GFAAS_MAX_PAYLOAD": str(settings.max_payload),
            "GFAAS_THREADS": str(settings.threads),
            "GFAAS_METRICS_ENABLED": str(settings.metrics_enabled).lower(),
            # Authentication: HTTP and gRPC want API keys; the keys' hashes are here.
            "GFAAS_NATS_AUTH": str(settings.nats_auth).lower(),
            "GFAAS_AUTH_DIR": str(auth.auth_dir(settings).resolve()),
            "GFAAS_NATS_TLS_CA": settings.nats_tls_ca,
            # TLS for ingress's HTTP and gRPC fronts (services/ingress/tls.py).
            "GFAAS_HTTP_TLS_CERT": settings.http_tls_cert,
            "GFAAS_HTTP_TLS_KEY": settings.http_tls_key,
            "PYTHONUNBUFFERED": "1",
            # Its workers are ours (restarted when they exit): errors say so.
            "GFAAS_SUPERVISED": "true",
        }
    )
    if not tracing.otlp_endpoint() and tracing.TRACE_DIR_ENV not in env:
        # No collector: spans go to local span files (`gfaas trace`); an empty
        # GFAAS_TRACE_DIR turns them off.
        directory = tracing.trace_dir(settings.state_dir.resolve())
        # There from the start: the CLI, seeing it, writes its own spans there too.
        directory.mkdir(parents=True, exist_ok=True)
        env[tracing.TRACE_DIR_ENV] = str(directory)
    env.update(extra)
    return env


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def planned_ports(
    settings: Settings, children: list[Child], nats_port: int | None
) -> list[tuple[str, str, int]]:
    """(what, host, port) of each fixed port the platform binds; ports 0 and -1 (any
    free one) are left out. `nats_port` None: an existing NATS server is used."""
    host = settings.http_host
    ports: list[tuple[str, str, int]] = []
    if nats_port is not None and nats_port > 0:
        ports.append(("NATS", "127.0.0.1", nats_port))
    if settings.http_enabled and settings.http_port > 0:
        ports.append(("ingress HTTP", host, settings.http_port))
    if settings.grpc_enabled and settings.grpc_port > 0:
        ports.append(("ingress gRPC", host, settings.grpc_port))
    if settings.metrics_enabled:
        for name, port in metrics_ports(children).items():
            if port > 0:
                ports.append((f"{name} metrics", host, port))
    return ports


def check_ports(ports: list[tuple[str, str, int]]) -> None:
    """Raise PortInUse for the first port already taken."""
    for what, host, port in ports:
        if port > 65535:  # GFAAS_GRPC_PORT, GFAAS_METRICS_PORT: bind's OverflowError
            raise PortInUse(f"gfaas up: port {port} ({what}) is no TCP port (1..65535)")
        if not _bindable(host, port):
            # Each service's metrics port is fixed by default and has no flag: a second
            # platform on the host, on ports of its own, met the first one's there.
            how = (
                " (GFAAS_METRICS_PORT=N: the metrics ports from N up; 0: any free ones)"
                if what.endswith(" metrics")
                else ""
            )
            raise PortInUse(
                f"gfaas up: port {port} ({what}) is already in use; stop whatever "
                f"holds it or choose another port{how}"
            )


def expected_services(children: list[Child]) -> dict[str, int]:
    """Status subject -> how many instances must answer it."""
    counts: dict[str, int] = {}
    for child in children:
        service = next(s for s in SERVICE_MODULES if child.name.startswith(s))
        counts[service] = counts.get(service, 0) + 1
    return counts


async def ready_counts(
    url: str, expected: Mapping[str, int], creds: Path | None = None
) -> dict[str, int]:
    """How many instances of each service answered its status subject just now."""
    from gfaas.client import Client

    counts: dict[str, int] = {}
    async with Client.connect(url, creds=creds) as client:
        for service, want in expected.items():
            found = await client.status_all(service, expect=want, timeout=0.5)
            counts[service] = len(found)
    return counts


async def front_ports(url: str, ingresses: int, creds: Path | None = None) -> dict[str, list[int]]:
    """The ports ingress's HTTP and gRPC fronts are bound to ("http_port",
    "grpc_port"), as each ingress reports them in its status: the kernel's choice
    where GFAAS_HTTP_PORT or GFAAS_GRPC_PORT is 0 (a port of its own for each
    replica then). Sorted, each port once."""
    from gfaas.client import Client

    async with Client.connect(url, creds=creds) as client:
        found = await client.status_all("ingress", expect=ingresses, timeout=2.0)
    ports: dict[str, list[int]] = {}
    for key in ("http_port", "grpc_port"):
        bound = {s.details.get(key) for s in found}
        ports[key] = sorted(p for p in bound if isinstance(p, int) and p > 0)
    return ports


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_device(index: int, gpus: int) -> str:
    """Workers are spread over the GPUs, one device each; CPU without any."""
    return f"cuda:{index % gpus}" if gpus else "cpu"


def plan_children(
    settings: Settings,
    nats_url: str,
    workers: int,
    replicas: int = 1,
    creds_dir: Path | None = None,
) -> list[Child]:
    """Workers: `workers` of them, or one per GPU (one on a CPU-only machine) for 0.
    Schedulers and ingresses: `replicas` each (one scheduler active, the others
    standing by; the ingresses share the load and, with SO_REUSEPORT, the HTTP port).
    With `creds_dir` (the embedded server's auth directory) each child connects as
    its service's NATS user (shared.auth)."""
    python = sys.executable
    children = [
        Child(
            "memory-broker",
            [python, "-m", SERVICE_MODULES["memory-broker"]],
            service_env(settings, nats_url),
        )
    ]
    for service in ("scheduler", "ingress"):
        for r in range(max(replicas, 1)):
            name = service if replicas <= 1 else f"{service}-{r}"
            argv = [python, "-m", SERVICE_MODULES[service]]
            children.append(Child(name, argv, service_env(settings, nats_url)))
    gpus = gpu_count()
    for i in range(workers or max(gpus, 1)):
        env = service_env(
            settings,
            nats_url,
            GFAAS_WORKER_ID=f"worker-{i}",
            GFAAS_DEVICE=worker_device(i, gpus),
        )
        children.append(
            Child(f"gpu-worker-{i}", [python, "-m", SERVICE_MODULES["gpu-worker"]], env)
        )
    assign_metrics_ports(settings, children)
    if creds_dir is not None:
        for child in children:
            service = next(s for s in auth.SERVICES if child.name.startswith(s))
            child.env["GFAAS_NATS_CREDS"] = str((creds_dir / f"{service}.json").resolve())
    return children


def assign_metrics_ports(settings: Settings, children: list[Child]) -> None:
    """Each child its own metrics port, from `metrics_port` (8002, ingress's default,
    for -1) up: ingresses first, then schedulers, the broker and the workers, so a
    one-replica platform gets each service's default port. 0 leaves every child to
    pick a free one (each status says which)."""
    base = settings.metrics_port if settings.metrics_port >= 0 else DEFAULT_METRICS_PORTS["ingress"]
    order = ["ingress", "scheduler", "memory-broker", "gpu-worker"]
    ranked = sorted(
        children, key=lambda c: next(i for i, p in enumerate(order) if c.name.startswith(p))
    )
    for i, child in enumerate(ranked):
        child.env["GFAAS_METRICS_PORT"] = str(base + i if base else 0)


def metrics_ports(children: list[Child]) -> dict[str, int]:
    """Child name -> the metrics port it was given (0: any free one)."""
    return {c.name: int(c.env.get("GFAAS_METRICS_PORT", "0")) for c in children}


@dataclass
class Supervisor:
    settings: Settings
    nats_url: str | None  # an existing server; None starts the embedded one
    nats_port: int = 4222  # for the embedded server; -1 picks a free port
    workers: int = 0  # 0: one per GPU, or one on a CPU-only machine
    replicas: int = 1  # schedulers and ingresses
    server: NatsServer | None = None
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    lock_fd: int | None = None  # the state directory's lock, held while running

    def start(self) -> str:
        self._lock_state_dir()
        url = self.nats_url
        creds_dir: Path | None = None
        if url is None:
            creds_dir = self._prepare_auth()
            nats_dir = self.settings.state_dir / "nats"
            self.server = start_nats_server(
                nats_dir,
                port=self.nats_port,
                max_payload=max(self.settings.max_payload, 1024 * 1024),
                extra_config=auth.server_config(
                    auth.AuthState.load(creds_dir),
                    pid_file=nats_dir / PID_FILE,
                    tls_cert=self.settings.nats_tls_cert,
                    tls_key=self.settings.nats_tls_key,
                ),
                scheme="tls" if self.settings.nats_tls_cert else "nats",
            )
            url = self.server.url
            log.info(
                "nats.started",
                url=url,
                store=str(self.server.store_dir),
                auth=self.settings.nats_auth,
            )
        self.children = plan_children(
            self.settings,
            url,
            self.workers,
            self.replicas,
            creds_dir=creds_dir if self.settings.nats_auth else None,
        )
        for child in self.children:
            child.start()
        return url

    def _lock_state_dir(self) -> None:
        """Hold the state directory's lock while this platform runs (the kernel lets
        go of it however this process ends), or raise StateDirInUse."""
        state_dir = self.settings.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirInUse(
                f"gfaas up: {state_dir} is the state directory of another gfaas up "
                f"(pid {holder}), still running; stop it or give this one its own "
                "--state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd

    def check_ports(self) -> None:
        """Raise PortInUse when a port the platform would bind is taken."""
        children = plan_children(self.settings, "nats://unused", self.workers, self.replicas)
        check_ports(
            planned_ports(self.settings, children, None if self.nats_url else self.nats_port)
        )

    def wait_ready(
        self, url: str, timeout: float = READY_TIMEOUT_S, stop: Callable[[], bool] = lambda: False
    ) -> int:
        """Wait until every service answers its status subject; the number of
        service instances. Raises StartFailed if a child exits first, or at `timeout`."""
        import anyio

        expected = expected_services(self.children)
        deadline = time.monotonic() + timeout
        counts: dict[str, int] = {}
        while not stop():
            for child in self.children:
                if not child.alive():
                    code = child.process.returncode if child.process else None
                    raise StartFailed(
                        f"gfaas up: {child.name} exited (code {code}) while starting; "
                        "its log is above"
                    )
            try:
                creds = auth.default_admin_creds(self.settings)
                counts = anyio.run(ready_counts, url, expected, creds)
            except Exception as exc:  # NATS not answering yet
                log.debug("ready.not_yet", error=repr(exc))
            if all(counts.get(s, 0) >= n for s, n in expected.items()):
                return sum(expected.values())
            if time.monotonic() >= deadline:
                missing = ", ".join(
                    f"{s} {counts.get(s, 0)} of {n}"
                    for s, n in expected.items()
                    if counts.get(s, 0) < n
                )
                raise StartFailed(f"gfaas up: not ready after {timeout:.0f}s ({missing} ready)")
            time.sleep(0.2)
        return 0

    def _prepare_auth(self) -> Path:
        """The embedded server's accounts, users and credentials (made at first start):
        with auth off every client without credentials is let in as the admin, so the
        store's layout (JetStream in the service account) is the same either way."""
        directory = auth.auth_dir(self.settings)
        state = auth.ensure(directory)
        auth.write_accounts(state, anonymous=not self.settings.nats_auth)
        if auth.adopt_unauthenticated_store(self.settings.state_dir / "nats" / "jetstream"):
            log.info("nats.store_adopted", account=auth.SERVICE_ACCOUNT)
        return directory

    def supervise_once(self, now: float) -> None:
        for child in self.children:
            if child.alive() or self.stopping:
                continue
            if child.next_start == 0.0:
                code = child.process.returncode if child.process else None
                delay = min(2.0**child.restarts * 0.5, 30.0)
                log.warning("child.exited", child=child.name, code=code, restart_in_s=delay)
                child.next_start = now + delay
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start()

    def stop(self) -> None:
        self.stopping = True
        # Intake first (ingress), the workers last, so in-flight work can finish.
        order = ["ingress", "scheduler", "gpu-worker", "memory-broker"]
        ranked = sorted(
            self.children,
            key=lambda c: next(i for i, p in enumerate(order) if c.name.startswith(p)),
        )
        for child in ranked:
            if child.alive() and child.process is not None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in ranked:
            if child.process is None:
                continue
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("child.killed", child=child.name)
                child.process.kill()
                child.process.wait()
        if self.server is not None:
            self.server.stop()
            log.info("nats.stopped")
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # the lock with it
            self.lock_fd = None


def run_up(
    sup: Supervisor, after_start: Callable[[str], bool] | None = None, *, ready: bool = False
) -> None:
    """Start everything, run `after_start(url)` (the demo), then supervise until
    SIGINT/SIGTERM, or stop at once when after_start returns False. With `ready`, the
    ports are checked first (PortInUse) and `after_start` runs once every service
    answers (StartFailed if one never does)."""
    stop_requested = False
    # While `after_start` runs (the demo's own event loop), a flag alone would not be
    # looked at until it returned: Ctrl-C and SIGTERM were ignored for as long as it
    # took. There, the first signal interrupts it instead.
    interrupting = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested, interrupting
        stop_requested = True
        if interrupting:
            interrupting = False
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if ready:
            sup.check_ports()
        url = sup.start()
        if ready:
            sup.wait_ready(url, stop=lambda: stop_requested)
            if stop_requested:
                return
        if after_start is not None:
            try:
                interrupting = True
                go_on = after_start(url)
            except KeyboardInterrupt:
                go_on = False  # stopped as asked, below
            finally:
                interrupting = False
            if not go_on:
                return
        while not stop_requested:
            sup.supervise_once(time.monotonic())
            time.sleep(0.1)
        log.info("supervisor.stopping")
    finally:
        sup.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
