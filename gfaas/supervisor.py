"""`gfaas up`: an embedded nats-server plus every service as its own OS process.

Children are started with a parent-death signal, so even a SIGKILLed supervisor
leaves no orphans. A child that crashes is restarted with backoff. SIGINT/SIGTERM
stops the services first (each drains its work), then the NATS server (which
flushes JetStream), so no state is lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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


def service_env(settings: Settings, nats_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GFAAS_NATS_URL": nats_url,
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
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_device(index: int, gpus: int) -> str:
    """Workers are spread over the GPUs, one device each; CPU without any."""
    return f"cuda:{index % gpus}" if gpus else "cpu"


def plan_children(
    settings: Settings, nats_url: str, workers: int, replicas: int = 1
) -> list[Child]:
    """Workers: `workers` of them, or one per GPU (one on a CPU-only machine) for 0.
    Schedulers and ingresses: `replicas` each (one scheduler active, the others
    standing by; the ingresses share the load and, with SO_REUSEPORT, the HTTP port)."""
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

    def start(self) -> str:
        url = self.nats_url
        if url is None:
            self.server = start_nats_server(
                self.settings.state_dir / "nats",
                port=self.nats_port,
                max_payload=max(self.settings.max_payload, 1024 * 1024),
            )
            url = self.server.url
            log.info("nats.started", url=url, store=str(self.server.store_dir))
        self.children = plan_children(self.settings, url, self.workers, self.replicas)
        for child in self.children:
            child.start()
        return url

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


def run_up(sup: Supervisor, after_start: Callable[[str], bool] | None = None) -> None:
    """Start everything, run `after_start(url)` (the demo), then supervise until
    SIGINT/SIGTERM, or stop at once when after_start returns False."""
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = sup.start()
        if after_start is not None and not after_start(url):
            return
        while not stop_requested:
            sup.supervise_once(time.monotonic())
            time.sleep(0.1)
        log.info("supervisor.stopping")
    finally:
        sup.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
