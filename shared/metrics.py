"""Metrics: OpenTelemetry instruments, read by Prometheus from one endpoint per service.

Each service process (or, in tests, each service on a shared event loop) gets its own
`MeterProvider` whose `PrometheusMetricReader` feeds a registry of its own, served as
Prometheus text on `http_host:metrics_port` (`start`, or `serve` inside a task group).
The port bound is in the service's status (`metrics_port`, via `port_of`).

The instruments live here, by service, so the names are in one place (dashboards,
tests). Names and units after the OpenTelemetry conventions: dotted names, seconds
("s") for durations, bytes ("By"), annotations in braces for counts; the Prometheus
exporter turns `gfaas.invocation.duration` (s) into `gfaas_invocation_duration_seconds`
and a counter `gfaas.invocations` into `gfaas_invocations_total`. Label values are
few: function and tenant names, error codes, phases, tiers, devices.

Observable instruments are read in the scrape's thread, so their callbacks read plain
numbers (or snapshots the service's loop keeps), never structures the loop mutates
while iterating.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation

from shared.config import DEFAULT_METRICS_PORTS, Settings
from shared.logs import get_logger

log = get_logger("metrics")

# Bucket bounds of every duration histogram, seconds: from a quick handler's half a
# millisecond to a minute-long model load.
SECONDS_BUCKETS: Sequence[float] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# The worker's phases of one run (`gfaas.worker.phase.duration`, label `phase`).
PHASES = ("load", "input", "queue", "execute", "output")
OK = "ok"
# The label value for a name a caller chose that names nothing (a function not
# deployed, a tenant that is not a valid name): each distinct one would be a new series
# kept for good. Not a valid name itself, so no function or tenant can share it.
UNNAMED = "(unknown)"

# (service, instance) -> the metrics port it serves, for its status.
_ports: dict[tuple[str, str], int] = {}
_ports_lock = threading.Lock()


def noop() -> Meter:
    """A meter that records nothing: instruments' default before a service serves."""
    return NoOpMeter("gfaas")


def port_of(service: str, instance: str) -> int | None:
    """The metrics port `instance` of `service` serves in this process, if any."""
    with _ports_lock:
        return _ports.get((service, instance))


@dataclass
class Telemetry:
    """One service's meter and the endpoint serving it (`port` None: not served)."""

    service: str
    instance: str
    meter: Meter
    port: int | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        with _ports_lock:
            _ports.pop((self.service, self.instance), None)
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            try:
                closer()
            except Exception as exc:  # shutting down anyway
                log.warning("metrics.close_failed", service=self.service, error=repr(exc))


def configured_port(settings: Settings, service: str) -> int:
    return (
        settings.metrics_port
        if settings.metrics_port >= 0
        else DEFAULT_METRICS_PORTS.get(service, 0)
    )


def start(
    settings: Settings,
    service: str,
    instance: str,
    *,
    connected: Callable[[], bool] | None = None,
) -> Telemetry:
    """A meter for `service` and its Prometheus endpoint, bound now. A port in use
    is one logged error and no endpoint (the service runs on without metrics)."""
    if not settings.metrics_enabled:
        return Telemetry(service, instance, noop())
    # Imported here: client commands import shared modules and must start quickly.
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import start_http_server

    registry = _flushing_registry()
    reader = PrometheusMetricReader(registry=registry)
    resource = Resource.create(
        {"service.name": f"gfaas-{service}", "service.instance.id": instance}
    )
    provider = MeterProvider(metric_readers=[reader], resource=resource, shutdown_on_exit=False)
    port = configured_port(settings, service)
    try:
        server, thread = start_http_server(port, addr=settings.http_host, registry=registry)
    except OSError as exc:
        log.error(
            "metrics.port_unavailable",
            service=service,
            host=settings.http_host,
            port=port,
            error=str(exc),
            hint="set GFAAS_METRICS_PORT (0: any free port)",
        )
        provider.shutdown()
        return Telemetry(service, instance, noop())
    bound: int = server.server_address[1]

    def stop_server() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)

    telemetry = Telemetry(
        service,
        instance,
        provider.get_meter("gfaas"),
        bound,
        [provider.shutdown, stop_server],
    )
    with _ports_lock:
        _ports[(service, instance)] = bound
    if connected is not None:
        observe_connection(telemetry.meter, connected)
    log.info("metrics.serving", service=service, port=bound)
    return telemetry


async def serve(
    settings: Settings,
    service: str,
    instance: str,
    connected: Callable[[], bool] | None = None,
    *,
    task_status: TaskStatus[Telemetry] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """`start`, as a task of the service's task group: started with the Telemetry,
    closed when the group is cancelled."""
    telemetry = start(settings, service, instance, connected=connected)
    try:
        task_status.started(telemetry)
        await anyio.sleep_forever()
    finally:
        telemetry.close()


def _guarded(read: Callable[[], Iterable[Observation]]) -> Callable[[CallbackOptions], Any]:
    """A callback that yields nothing rather than fail when the loop changed what it
    was reading (a dict resized during the scrape)."""

    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        try:
            return list(read())
        except RuntimeError:
            return []

    return callback


def observe_connection(meter: Meter, connected: Callable[[], bool]) -> None:
    meter.create_observable_gauge(
        "gfaas.nats.connected",
        callbacks=[_guarded(lambda: [Observation(1 if connected() else 0)])],
        description="1 while this service's NATS connection is up, else 0",
    )


# Later's waiting measurements: counter sums by (instrument, labels); histogram values.
_Sums = dict[tuple[Any, tuple[tuple[str, str], ...]], float]
_Values = list[tuple[Any, float, dict[str, str]]]


class Later:
    """Measurements taken on a request's path, applied to their instruments when a
    scrape collects (or once `LIMIT` wait): an OpenTelemetry `add` or `record` costs
    about 6 us here, a dict update or list append well under one, and an invocation
    takes ten of them across ingress and its worker. Counters are summed here per
    instrument and label set (bounded by the labels, not by the calls: a platform
    nobody scrapes keeps none of them waiting); histogram values wait in a list. The
    totals a scrape reads are the same. `flush` runs in the scrape's thread, or,
    once `LIMIT` wait (nobody scrapes), in a thread of its own: applied on the
    caller's loop, 4,096 of them stalled that one request by tens of ms. Taking a
    measurement and the swap in `_take` hold one lock, so none lands in a batch
    already being applied."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._sums: _Sums = {}
        self._pending: _Values = []
        self._lock = threading.Lock()

    def add(self, instrument: Any, value: float, attributes: dict[str, str]) -> None:
        key = (instrument, tuple(attributes.items()))
        with self._lock:
            sums = self._sums
            sums[key] = sums.get(key, 0) + value
            full = len(sums) >= self.LIMIT
        if full:
            self._flush_aside()

    def record(self, instrument: Any, value: float, attributes: dict[str, str]) -> None:
        with self._lock:
            pending = self._pending
            pending.append((instrument.record, value, attributes))
            full = len(pending) >= self.LIMIT
        if full:
            self._flush_aside()

    def _flush_aside(self) -> None:
        sums, pending = self._take()
        threading.Thread(
            target=self._apply, args=(sums, pending), name="metrics-flush", daemon=True
        ).start()

    def flush(self) -> None:
        self._apply(*self._take())

    def _take(self) -> tuple[_Sums, _Values]:
        with self._lock:
            sums, self._sums = self._sums, {}
            pending, self._pending = self._pending, []
        return sums, pending

    @staticmethod
    def _apply(sums: _Sums, pending: _Values) -> None:
        for (instrument, labels), total in sums.items():
            instrument.add(total, dict(labels))
        for apply, value, attributes in pending:
            apply(value, attributes)


# One per process: every service's instruments share it, and its scrape flushes it.
LATER = Later()


def _flushing_registry() -> Any:
    """A Prometheus registry that applies `LATER` before each collection."""
    from prometheus_client import CollectorRegistry

    class FlushingRegistry(CollectorRegistry):
        def collect(self) -> Any:
            LATER.flush()
            return super().collect()

    return FlushingRegistry(auto_describe=True)


def _seconds_histogram(meter: Meter, name: str, description: str) -> Any:
    return meter.create_histogram(
        name, unit="s", description=description, explicit_bucket_boundaries_advisory=SECONDS_BUCKETS
    )


# -- per service ---------------------------------------------------------------------------


class IngressMetrics:
    """End to end, as ingress sees each invocation: from its arrival to its reply (for
    a reply the worker sends the caller itself, to the worker's done note, sent just
    before that reply)."""

    def __init__(self, meter: Meter) -> None:
        self.invocations = meter.create_counter(
            "gfaas.invocations",
            unit="{invocation}",
            description="Invocations by function, tenant and outcome (ok, or the error code)",
        )
        self.duration = _seconds_histogram(
            meter, "gfaas.invocation.duration", "Invocation duration at ingress, end to end"
        )
        # SLO attainment: on-time calls over all of `gfaas.invocations` of a function.
        self.on_time = meter.create_counter(
            "gfaas.invocations.on_time",
            unit="{invocation}",
            description="Invocations answered ok within their spec's slo_ms",
        )

    def finished(
        self,
        function: str,
        tenant: str,
        outcome: str,
        seconds: float | None,
        *,
        slo_ms: float | None = None,
    ) -> None:
        attributes = {"function": function, "tenant": tenant, "outcome": outcome}
        LATER.add(self.invocations, 1, attributes)
        if seconds is not None:
            LATER.record(self.duration, seconds, attributes)
            if outcome == OK and slo_ms is not None and seconds * 1000.0 <= slo_ms:
                LATER.add(self.on_time, 1, {"function": function, "tenant": tenant})


class WorkerMetrics:
    """One worker's runs: outcomes, per-phase durations, cold starts, cache tiers."""

    def __init__(
        self,
        meter: Meter,
        *,
        loads: Callable[[], Mapping[str, int]] | None = None,
        device_bytes: Callable[[], int] | None = None,
        device: str = "",
        device_memory: Callable[[], Mapping[str, int]] | None = None,
        utilization: Callable[[], float | None] | None = None,
    ) -> None:
        self.runs = meter.create_counter(
            "gfaas.worker.invocations",
            unit="{invocation}",
            description="Invocations this worker ran, by function, tenant and outcome",
        )
        self.phases = _seconds_histogram(
            meter,
            "gfaas.worker.phase.duration",
            "Time in each phase of a run: load (swap-in on a cold start), input "
            "(staging inputs), queue (waiting for the function's concurrency), "
            "execute (the handler), output (staging outputs)",
        )
        self.coldstarts = meter.create_counter(
            "gfaas.coldstarts",
            unit="{coldstart}",
            description="Runs that had to load their function (faas.coldstarts)",
        )
        self.cache = meter.create_counter(
            "gfaas.cache.requests",
            unit="{request}",
            description="Handler cache look-ups by tier and result (hit or miss)",
        )
        if loads is not None:
            read_loads = loads

            def observe_loads() -> list[Observation]:
                return [Observation(n, {"tier": tier}) for tier, n in read_loads().items()]

            meter.create_observable_counter(
                "gfaas.cache.loads",
                callbacks=[_guarded(observe_loads)],
                unit="{load}",
                description="Loads into each tier (device: swap-ins; host: object store reads)",
            )
        if device_bytes is not None:
            read_bytes = device_bytes
            meter.create_observable_gauge(
                "gfaas.cache.usage",
                callbacks=[_guarded(lambda: [Observation(read_bytes(), {"tier": "device"})])],
                unit="By",
                description="Bytes of models resident in the tier",
            )
        if device_memory is not None:
            read_memory = device_memory

            def observe_memory() -> list[Observation]:
                return [
                    Observation(n, {"device": device, "kind": kind})
                    for kind, n in read_memory().items()
                ]

            meter.create_observable_gauge(
                "gfaas.device.memory",
                callbacks=[_guarded(observe_memory)],
                unit="By",
                description="The worker's device memory by kind (total, used, free): NVML on "
                "CUDA, the host's memory on CPU",
            )
        if utilization is not None:
            read_utilization = utilization

            def observe_utilization() -> list[Observation]:
                busy = read_utilization()
                return [] if busy is None else [Observation(busy, {"device": device})]

            meter.create_observable_gauge(
                "gfaas.device.utilization",
                callbacks=[_guarded(observe_utilization)],
                unit="1",
                description="Fraction of the last sample period the device was busy (NVML "
                "on CUDA, CPU utilisation on CPU)",
            )

    def phase(self, function: str, phase: str, seconds: float) -> None:
        LATER.record(self.phases, max(seconds, 0.0), {"function": function, "phase": phase})

    def looked_up(self, function: str, *, hit: bool, weights_from: str = "") -> None:
        """A run's look-up of its handler in the device tier; on a miss of a function
        with a model, whether the host tier had the weights (`weights_from` "host")
        or they came from the object store ("store")."""
        LATER.add(self.cache, 1, {"tier": "device", "result": "hit" if hit else "miss"})
        if not hit:
            LATER.add(self.coldstarts, 1, {"function": function})
            if weights_from:
                result = "hit" if weights_from == "host" else "miss"
                LATER.add(self.cache, 1, {"tier": "host", "result": result})

    def finished(self, function: str, tenant: str, outcome: str) -> None:
        LATER.add(self.runs, 1, {"function": function, "tenant": tenant, "outcome": outcome})


class SchedulerMetrics:
    def __init__(
        self,
        meter: Meter,
        pending: Callable[[], int] | None = None,
        instances: Callable[[], Iterable[tuple[str, str]]] | None = None,
        shares: Callable[[], Iterable[InstanceShare]] | None = None,
    ) -> None:
        self.decisions = _seconds_histogram(
            meter,
            "gfaas.scheduler.decision.duration",
            "Time the policy took to decide: one new invocation (decide) or the queue (plan)",
        )
        self.scale_from_zero = _seconds_histogram(
            meter,
            "gfaas.scale_from_zero.duration",
            "From a request finding its function with no instance to the new instance "
            "taking it (the instance's start, as the request waited for it)",
        )
        if pending is not None:
            read = pending
            meter.create_observable_gauge(
                "gfaas.scheduler.queue.depth",
                callbacks=[_guarded(lambda: [Observation(read())])],
                unit="{invocation}",
                description="Invocations queued at the scheduler for a free worker",
            )
        if instances is not None:
            read_instances = instances

            def observe_instances() -> list[Observation]:
                counts: dict[tuple[str, str], int] = {}
                for key in read_instances():
                    counts[key] = counts.get(key, 0) + 1
                return [
                    Observation(n, {"function": function, "state": state})
                    for (function, state), n in counts.items()
                ]

            meter.create_observable_gauge(
                "gfaas.instances",
                callbacks=[_guarded(observe_instances)],
                unit="{instance}",
                description="Function instances the node agents report, by function and state",
            )

        if shares is not None:
            read_shares = shares

            def totals() -> dict[tuple[str, str], tuple[float, int]]:
                out: dict[tuple[str, str], tuple[float, int]] = {}
                for s in read_shares():
                    share, memory = out.get((s.function, s.device), (0.0, 0))
                    out[(s.function, s.device)] = (
                        share + s.sm_share * s.time_quota,
                        memory + s.memory_bytes,
                    )
                return out

            def observe_share() -> list[Observation]:
                return [
                    Observation(round(share, 6), {"function": f, "device": d})
                    for (f, d), (share, _) in totals().items()
                ]

            def observe_memory() -> list[Observation]:
                return [
                    Observation(memory, {"function": f, "device": d})
                    for (f, d), (_, memory) in totals().items()
                ]

            meter.create_observable_gauge(
                "gfaas.instances.share",
                callbacks=[_guarded(observe_share)],
                unit="1",
                description="Device share the function's instances hold on each device: the "
                "sum of sm_share x time_quota (1 = a whole device)",
            )
            meter.create_observable_gauge(
                "gfaas.instances.memory",
                callbacks=[_guarded(observe_memory)],
                unit="By",
                description="Memory budgets of the function's instances on each device",
            )

    def decided(self, kind: str, seconds: float) -> None:
        LATER.record(self.decisions, seconds, {"kind": kind})

    def scaled_from_zero(self, function: str, seconds: float) -> None:
        LATER.record(self.scale_from_zero, max(seconds, 0.0), {"function": function})


@dataclass(frozen=True)
class InstanceShare:
    """One instance's shares, as its agent last reported them."""

    function: str
    device: str  # the agent's id: one device each
    sm_share: float
    time_quota: float
    memory_bytes: int


@dataclass
class PoolSnapshot:
    """A node's pools as the broker's loop last read them (read in the scrape thread)."""

    leased: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    slabs: dict[str, int] = field(default_factory=dict)
    leases: int = 0
    spills: int = 0
    # (link, flow) -> bytes copied for that flow (a function's staging, spills, ...).
    link_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    link_busy_s: dict[str, float] = field(default_factory=dict)


class BrokerMetrics:
    def __init__(self, meter: Meter) -> None:
        self.snapshot = PoolSnapshot()

        def per_device(values: Callable[[], dict[str, int]]) -> Callable[[CallbackOptions], Any]:
            return _guarded(lambda: [Observation(n, {"device": d}) for d, n in values().items()])

        meter.create_observable_gauge(
            "gfaas.pool.leased",
            callbacks=[per_device(lambda: self.snapshot.leased)],
            unit="By",
            description="Bytes leased out of each device's pool",
        )
        meter.create_observable_gauge(
            "gfaas.pool.held",
            callbacks=[per_device(lambda: self.snapshot.held)],
            unit="By",
            description="Bytes of slabs each device's pool holds (leased or free)",
        )
        meter.create_observable_gauge(
            "gfaas.pool.slabs",
            callbacks=[per_device(lambda: self.snapshot.slabs)],
            unit="{slab}",
            description="Slabs each device's pool holds",
        )
        meter.create_observable_gauge(
            "gfaas.pool.leases",
            callbacks=[_guarded(lambda: [Observation(self.snapshot.leases)])],
            unit="{lease}",
            description="Live leases on this node",
        )
        meter.create_observable_counter(
            "gfaas.pool.spills",
            callbacks=[_guarded(lambda: [Observation(self.snapshot.spills)])],
            unit="{spill}",
            description="Parked leases spilled to host memory",
        )
        meter.create_observable_counter(
            "gfaas.link.transferred",
            callbacks=[
                _guarded(
                    lambda: [
                        Observation(n, {"link": link, "flow": flow})
                        for (link, flow), n in self.snapshot.link_bytes.items()
                    ]
                )
            ],
            unit="By",
            description="Bytes copied over each link, by flow (the function whose inputs or "
            "outputs moved, or the broker's own spill traffic)",
        )
        meter.create_observable_counter(
            "gfaas.link.busy.time",
            callbacks=[
                _guarded(
                    lambda: [
                        Observation(s, {"link": link})
                        for link, s in self.snapshot.link_busy_s.items()
                    ]
                )
            ],
            unit="s",
            description="Time each link spent copying: its rate is the link's utilisation",
        )
