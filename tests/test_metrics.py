"""Metrics: every service serves Prometheus text on its own port (in its status), and
the counters and histograms move as invocations run, read back with
prometheus_client's own text parser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from bench.live_models import write_mlp
from gfaas.client import Client
from shared.dataplane.client import BrokerClient
from shared.metrics import UNNAMED
from shared.natsd import NatsServer
from shared.schema import H_TENANT, CopyRequest, FunctionSpec
from tests.helpers import body, deploy_and_wait, final_result, request
from tests.platform import Platform, platform_at
from tests.specs import ECHO

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


BOOM = FunctionSpec(name="boom", handler="tests.funcs:boom")
SERVICES = ("ingress", "scheduler", "memory-broker", "gpu-worker")

Samples = list[tuple[str, dict[str, str], float]]


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    response.raise_for_status()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


async def ports(client: Client) -> dict[str, int]:
    found: dict[str, int] = {}
    for service in SERVICES:
        status = await client.status(service)
        port = status.details.get("metrics_port")
        assert isinstance(port, int), (service, status.details)
        assert port > 0, (service, status.details)
        found[service] = port
    return found


async def test_every_service_serves_its_metrics_and_they_move(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, ECHO, BOOM)
    where = await ports(client)
    assert len(set(where.values())) == len(SERVICES), where
    x = np.ones((2, 3), dtype=np.float32)
    for _ in range(3):
        _, reply = await request(nc, "echo", body(x=x))
        assert "error" not in reply, reply
    _, failed = await request(nc, "boom", body(x=x))
    assert failed["error"]["code"] == "handler_error"
    # Names callers choose and nothing vouches for (functions not deployed, tenants
    # that are not names) are one label value each, not a series per name.
    for name in ("no-such-function", "nor-this", "nor-that"):
        _, unknown = await request(nc, name, body(x=x))
        assert unknown["error"]["code"] == "unknown_function"
    for tenant in ("Not A Name", "x" * 300):
        msg = await nc.request(
            "gfaas.v1.invoke.echo", body(x=x), timeout=10, headers={H_TENANT: tenant}
        )
        assert msgspec.msgpack.decode(msg.data)["error"]["code"] == "bad_request"

    # Ingress counts each at its done note, sent just before the reply: wait for it.
    ingress: Samples = []
    with anyio.fail_after(5):
        while value(ingress, "gfaas_invocations_total", function="boom") < 1:
            await anyio.sleep(0.05)
            ingress = await scrape(where["ingress"])
    assert value(ingress, "gfaas_invocations_total", function="echo", outcome="ok") == 3
    assert value(ingress, "gfaas_invocations_total", function="echo", tenant="default") == 3
    assert value(ingress, "gfaas_invocations_total", function="boom", outcome="handler_error") == 1
    total, refused = "gfaas_invocations_total", UNNAMED
    assert value(ingress, total, function=refused, outcome="unknown_function") == 3
    assert value(ingress, total, function="echo", tenant=refused) == 2
    labels = {(lab["function"], lab["tenant"]) for n, lab, _ in ingress if n == total}
    assert labels == {
        ("echo", "default"),
        ("boom", "default"),
        (refused, "default"),
        ("echo", refused),
    }
    ok = {"function": "echo", "outcome": "ok"}
    assert value(ingress, "gfaas_invocation_duration_seconds_count", **ok) == 3
    assert value(ingress, "gfaas_invocation_duration_seconds_sum", **ok) > 0
    assert value(ingress, "gfaas_invocation_duration_seconds_bucket", le="+Inf", **ok) == 3
    assert value(ingress, "gfaas_nats_connected") == 1

    worker = await scrape(where["gpu-worker"])
    assert value(worker, "gfaas_worker_invocations_total", function="echo", outcome="ok") == 3
    assert (
        value(worker, "gfaas_worker_invocations_total", function="boom", outcome="handler_error")
        == 1
    )
    # Each function loaded once: one cold start, then hits.
    assert value(worker, "gfaas_coldstarts_total", function="echo") == 1
    assert value(worker, "gfaas_cache_requests_total", tier="device", result="miss") == 2
    assert value(worker, "gfaas_cache_requests_total", tier="device", result="hit") == 2
    for phase in ("input", "queue", "execute", "output"):
        count = "gfaas_worker_phase_duration_seconds_count"
        assert value(worker, count, function="echo", phase=phase) == 3, phase
    assert value(worker, "gfaas_worker_phase_duration_seconds_count", phase="load") == 2
    assert value(worker, "gfaas_cache_loads_total", tier="device") == 2

    scheduler = await scrape(where["scheduler"])
    # Every invocation the scheduler placed was one decision (unknown ones stop at
    # ingress).
    assert value(scheduler, "gfaas_scheduler_decision_duration_seconds_count", kind="decide") == 4
    assert value(scheduler, "gfaas_scheduler_queue_depth") == 0
    assert value(scheduler, "gfaas_nats_connected") == 1

    broker = await scrape(where["memory-broker"])
    names = {n for n, _, _ in broker}
    for name in ("gfaas_pool_leased_bytes", "gfaas_pool_held_bytes", "gfaas_pool_slabs"):
        assert name in names, sorted(names)
    assert value(broker, "gfaas_nats_connected") == 1


async def until(port: int, name: str, want: float, **labels: str) -> Samples:
    """A scrape in which `name` (summed over `labels`) has reached `want`."""
    samples: Samples = []
    with anyio.fail_after(30):
        while value(samples, name, **labels) < want:
            await anyio.sleep(0.1)
            samples = await scrape(port)
    return samples


@pytest.fixture
def no_prefetch(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    """A node that leaves deployed models out of its host tier until a request loads
    one (prefetch would turn the first load's miss into a hit)."""
    with platform_at(nats_server.url, tmp_path / "np", host_prefetch_mb=0) as p:
        yield p


async def test_host_tier_hits_instance_shares_and_link_flows_are_metrics(
    no_prefetch: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    weights = tmp_path / "m2.pt"
    write_mlp(weights, 2, seed=0)
    await client.push_model("m2", weights)
    # Two functions over one model: the first fetches it into the host tier, the
    # second finds it there (a device miss each, then a host miss and a host hit).
    mlps = [
        FunctionSpec(name=f"mlp-{n}", handler="bench.live_models:Mlp", model="m2") for n in "ab"
    ]
    # An instance holding half the SMs for half of every window.
    shared = FunctionSpec(
        name="echo-half",
        handler="tests.funcs:echo",
        min_instances=1,
        sm_share=0.5,
        time_quota=0.5,
        memory_mb=300,
    )
    await deploy_and_wait(nc, *mlps, shared)
    x = np.ones((1, 512), dtype=np.float32)
    for spec in mlps:
        await client.invoke(spec.name, {"x": x})
    where = await ports(client)
    worker = await until(where["gpu-worker"], "gfaas_cache_requests_total", 2, tier="host")
    assert value(worker, "gfaas_cache_requests_total", tier="host", result="miss") == 1
    assert value(worker, "gfaas_cache_requests_total", tier="host", result="hit") == 1

    scheduler = await until(where["scheduler"], "gfaas_instances_share", 0.25)
    assert value(scheduler, "gfaas_instances_share", function="echo-half") == 0.25
    assert value(scheduler, "gfaas_instances_memory_bytes", function="echo-half") == 300 * 2**20

    # A broker copy of 4 MiB for flow "flow-a": its bytes, by link and flow, and the
    # time the link was busy.
    source = await client.put("x", np.zeros(2**20, dtype=np.float32))
    assert source.handle is not None
    copy = CopyRequest(source=source.handle, device="cpu", owner="t", flow="flow-a")
    await BrokerClient(nc, "local").copy(copy, "default")
    broker = await until(
        where["memory-broker"], "gfaas_link_transferred_bytes_total", 4 * 2**20, flow="flow-a"
    )
    links = {lab["link"] for n, lab, _ in broker if n == "gfaas_link_transferred_bytes_total"}
    assert value(broker, "gfaas_link_transferred_bytes_total", flow="flow-a") == 4 * 2**20
    assert all(value(broker, "gfaas_link_busy_time_seconds_total", link=k) > 0 for k in links)


def test_metrics_off_serves_nothing() -> None:
    from shared import metrics
    from shared.config import Settings

    telemetry = metrics.start(Settings(metrics_enabled=False), "ingress", "x")
    assert telemetry.port is None
    assert metrics.port_of("ingress", "x") is None
    telemetry.close()


def test_ephemeral_port_is_reported_and_freed() -> None:
    from shared import metrics
    from shared.config import Settings

    telemetry = metrics.start(Settings(metrics_port=0, http_host="127.0.0.1"), "scheduler", "t1")
    try:
        assert telemetry.port is not None
        assert telemetry.port > 0
        assert metrics.port_of("scheduler", "t1") == telemetry.port
        counter: Any = telemetry.meter.create_counter("gfaas.test.things", unit="{thing}")
        counter.add(2, {"kind": "a"})
        text = httpx.get(f"http://127.0.0.1:{telemetry.port}/metrics", timeout=5).text
        samples = [
            (s.name, s.labels, s.value)
            for f in text_string_to_metric_families(text)
            for s in f.samples
        ]
        assert ("gfaas_test_things_total", {"kind": "a"}, 2.0) in [
            (n, {k: v for k, v in lab.items() if k == "kind"}, v) for n, lab, v in samples
        ]
    finally:
        telemetry.close()
    assert metrics.port_of("scheduler", "t1") is None


def test_deferred_counters_are_summed_per_label_set_and_histograms_kept_whole() -> None:
    # A platform nobody scrapes keeps one sum per counter and label set, not one
    # entry per call; a flush applies the same totals direct calls would.
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from shared.metrics import Later

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    runs, seconds = meter.create_counter("runs"), meter.create_histogram("seconds")
    later = Later()
    for n in range(1000):
        later.add(runs, 1, {"function": "f", "outcome": "ok" if n % 4 else "error"})
        later.record(seconds, n / 1000, {"function": "f"})
    assert len(later._sums) == 2
    later.flush()
    assert not later._sums
    assert not later._pending
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, Any] = {
        m.name: m.data.data_points
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    totals = {p.attributes["outcome"]: p.value for p in points["runs"]}
    assert totals == {"ok": 750, "error": 250}
    (hist,) = points["seconds"]
    assert hist.count == 1000
    assert abs(hist.sum - sum(n / 1000 for n in range(1000))) < 1e-9


def test_deferred_measurements_past_the_limit_are_applied_off_the_callers_thread() -> None:
    import threading
    import time

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from shared.metrics import Later

    reader = InMemoryMetricReader()
    seconds = MeterProvider(metric_readers=[reader]).get_meter("t").create_histogram("s")
    applied_in: set[str] = set()

    class Seen:
        def record(self, value: float, attributes: dict[str, str]) -> None:
            applied_in.add(threading.current_thread().name)
            seconds.record(value, attributes)

    later = Later()
    later.LIMIT = 100
    for n in range(250):
        later.record(Seen(), n, {"function": "f"})
    assert len(later._pending) == 50  # two batches of 100 went aside
    deadline = time.monotonic() + 5
    while any(t.name == "metrics-flush" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert applied_in == {"metrics-flush"}
    later.flush()
    data = reader.get_metrics_data()
    assert data is not None
    (hist,) = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert getattr(hist, "count", None) == 250


async def test_a_run_that_crashed_counts_as_the_internal_error_its_caller_got(
    platform: Platform, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run that fails with no GfaasError (a bug, a registry read timing out) is
    # answered `internal`: both the worker's and ingress's counts must say so.
    from services.gpu_worker.execute import Executor

    await deploy_and_wait(nc, ECHO)

    async def crash(self: Executor, meta: object, body: bytes) -> Any:
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(Executor, "execute", crash)
    _, reply = await request(nc, "echo", body(x=np.ones(1)))
    assert reply["error"]["code"] == "internal", reply
    where = await ports(Client(nc))
    ingress = await until(where["ingress"], "gfaas_invocations_total", 1, function="echo")
    assert value(ingress, "gfaas_invocations_total", function="echo", outcome="internal") == 1
    worker = await until(where["gpu-worker"], "gfaas_worker_invocations_total", 1)
    assert value(worker, "gfaas_worker_invocations_total", function="echo", outcome="internal") == 1


async def test_async_invocations_count_once_each_with_their_outcome(
    platform: Platform, nc: NATS
) -> None:
    """Async invocations count in gfaas_invocations_total as sync calls do, once each:
    a success, a handler's error and a malformed message (dead-lettered, never run:
    it was not counted at all)."""
    await deploy_and_wait(nc, ECHO, BOOM)
    client = Client(nc)
    ok = await client.invoke_async("echo", {"x": np.ones(2, dtype=np.float32)})
    failed = await client.invoke_async("boom", {"x": np.ones(2, dtype=np.float32)})
    await nc.jetstream().publish(
        "gfaas.v1.invoke_async.echo", b"\xc1garbage", headers={"Nats-Msg-Id": "garbled-m"}
    )
    for invocation_id in (ok, failed, "garbled-m"):
        await final_result(client, invocation_id)
    where = await ports(client)
    total = "gfaas_invocations_total"
    await until(where["ingress"], total, 3)
    await anyio.sleep(0.3)  # anything counted twice is counted by now
    ingress = await scrape(where["ingress"])
    assert value(ingress, total, function="echo", tenant="default", outcome="ok") == 1
    assert value(ingress, total, function="boom", outcome="handler_error") == 1
    assert value(ingress, total, function="echo", outcome="bad_request") == 1
    assert value(ingress, total) == 3
    assert value(ingress, "gfaas_invocation_duration_seconds_count", function="echo") == 2
