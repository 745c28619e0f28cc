"""The Grafana dashboard and the compose stack's observability against what the services
really export.

A real platform runs invocations (ok, failed, unknown), a function with an instance
and a broker copy; every service is scraped. Then: every metric the dashboard names is
in that scrape, and every PromQL expression in the dashboard evaluates to something,
with `promtool test rules` over series made from the scrape (Debian's `prometheus`
package gives promtool; without it that test is skipped). The compose healthcheck
(`gfaas health SERVICE`) answers for each service there, and not for another host's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import anyio
import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gfaas import cli
from gfaas.client import Client
from shared.config import DEFAULT_METRICS_PORTS
from shared.dataplane.client import BrokerClient
from shared.natsd import nats_server as nats_server_at
from shared.schema import CopyRequest, FunctionSpec
from tests.helpers import body, deploy_and_wait, request
from tests.platform import platform_at
from tests.specs import ECHO

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "gfaas.json").read_text())
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
SERVICES = tuple(DEFAULT_METRICS_PORTS)

BOOM = FunctionSpec(name="boom", handler="tests.funcs:boom")
# A function served by an instance of its own (the scheduler's gfaas_instances).
# Half the device each, so that both fit on the one agent.
ECHO_I = FunctionSpec(
    name="echo-i", handler="tests.funcs:echo", min_instances=1, max_instances=1, sm_share=0.5
)
# One that scales from zero on its first call (gfaas_scale_from_zero_duration_seconds).
ECHO_Z = FunctionSpec(
    name="echo-z", handler="tests.funcs:echo", max_instances=1, idle_s=60, sm_share=0.5
)

# Grafana's variables, as the dashboard's queries use them, for promtool.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "10m",
    '=~"$function"': '=~".*"',
    '=~"$tenant"': '=~".*"',
}
# Names PromQL or Prometheus itself provide, not a service.
PROMETHEUS_NAMES = {"up"}
# What the issue asks the dashboard to show: each of these must be on it.
REQUIRED = {
    "gfaas_invocations_total",
    "gfaas_invocation_duration_seconds_bucket",
    "gfaas_invocations_on_time_total",
    "gfaas_coldstarts_total",
    "gfaas_cache_requests_total",
    "gfaas_instances",
    "gfaas_device_memory_bytes",
    "gfaas_device_utilization",
    "gfaas_pool_leased_bytes",
    "gfaas_link_transferred_bytes_total",
    "gfaas_link_busy_time_seconds_total",
    "gfaas_instances_share",
}
NAME = re.compile(r"\b(gfaas_[a-z0-9_]+|up)\b(?!\s*\()")


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    value: float
    kind: str  # the family's type: counter, gauge, histogram, ...


@dataclass
class Scrape:
    series: list[Series]
    health: dict[str, int]
    health_elsewhere: int

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.series}


def expressions() -> list[str]:
    return [
        target["expr"]
        for panel in DASHBOARD["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def names_in(expr: str) -> set[str]:
    # Label names and values are inside braces or quotes: drop those first.
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "{}", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    return set(NAME.findall(bare))


def variable_queries() -> list[str]:
    return [v["query"]["query"] for v in DASHBOARD["templating"]["list"]]


# -- a real platform, scraped --------------------------------------------------------------


async def scrape(port: int, job: str) -> list[Series]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    response.raise_for_status()
    # The labels Prometheus adds to every series it scrapes.
    target = {"job": job, "instance": f"{job}:{DEFAULT_METRICS_PORTS[job]}"}
    return [
        Series(s.name, {**dict(s.labels), **target}, s.value, family.type)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


async def scrape_all(client: Client) -> list[Series]:
    found: list[Series] = []
    for service in SERVICES:
        # The node's worker (w0, its devices' agent), not one of the instances that
        # also answer as gpu-workers.
        statuses = await client.status_all(service, timeout=1.0)
        (status,) = [
            s for s in statuses if service != "gpu-worker" or "agent" in s.details
        ] or statuses[:1]
        port = status.details["metrics_port"]
        assert isinstance(port, int), service
        found += await scrape(port, service)
    return found


async def drive(url: str) -> Scrape:
    async with Client.connect(url) as client:
        nc = client.nc
        await deploy_and_wait(nc, ECHO, BOOM, ECHO_I, ECHO_Z)
        x = np.ones((2, 3), dtype=np.float32)
        for _ in range(3):
            _, reply = await request(nc, "echo", body(x=x))
            assert "error" not in reply, reply
        _, failed = await request(nc, "boom", body(x=x))
        assert failed["error"]["code"] == "handler_error"
        _, cold = await request(nc, "echo-z", body(x=x), timeout=30)
        assert "error" not in cold, cold
        _, unknown = await request(nc, "no-such-function", body(x=x))
        assert unknown["error"]["code"] == "unknown_function"
        # A broker copy: bytes over a link, and a lease in the pool.
        source = await client.put("x", np.arange(1024 * 1024, dtype=np.float32))
        assert source.handle is not None
        copy = CopyRequest(source=source.handle, device="cpu", owner="t", flow="dash")
        await BrokerClient(nc, "local").copy(copy, "default")

        def wanted(series: list[Series]) -> bool:
            names = {s.name for s in series}
            boom = [s for s in series if s.name == "gfaas_invocations_total"]
            wanted = {
                "gfaas_instances",
                "gfaas_link_transferred_bytes_total",
                "gfaas_scale_from_zero_duration_seconds_count",
            }
            return wanted <= names and any(s.labels.get("function") == "boom" for s in boom)

        # Ingress counts at the done note; the instance starts in its own process; the
        # broker's gauges read a snapshot its loop refreshes.
        series: list[Series] = []
        with anyio.fail_after(90):
            while not wanted(series):
                await anyio.sleep(0.2)
                series = await scrape_all(client)

        health = {s: await cli._health(url, s, False) for s in SERVICES if s != "gpu-worker"}
        # The test platform names its worker w0; compose's are named after their host
        # (services.gpu_worker.app.default_worker_id).
        with mock.patch("socket.gethostname", return_value="w0"):
            health["gpu-worker"] = await cli._health(url, "gpu-worker", False)
        with mock.patch("socket.gethostname", return_value="another-host"):
            elsewhere = await cli._health(url, "ingress", False)
        return Scrape(series, health, elsewhere)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    tmp = tmp_path_factory.mktemp("dashboards")
    with nats_server_at(tmp / "nats") as server, platform_at(server.url, tmp / "state"):
        yield anyio.run(drive, server.url)


# -- against the scrape ----------------------------------------------------------------------


@pytest.mark.slow  # a whole platform driven and scraped (18 s): keeps the quick run short
@pytest.mark.nats
def test_every_metric_the_dashboard_uses_is_exported(scraped: Scrape) -> None:
    used = set().union(*(names_in(e) for e in expressions()))
    missing = sorted(used - scraped.names - PROMETHEUS_NAMES)
    assert missing == [], f"the dashboard queries metrics no service exports: {missing}"
    assert sorted(REQUIRED - used) == [], "the dashboard lacks a panel the issue asks for"
    for query in variable_queries():
        assert names_in(query) <= scraped.names, query


@pytest.mark.slow  # a whole platform driven and scraped (18 s): keeps the quick run short
@pytest.mark.nats
def test_every_dashboard_expression_evaluates_with_promtool(
    scraped: Scrape, tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian: apt-get install prometheus)")
    exprs = expressions()
    jobs = [job["job_name"] for job in PROMETHEUS["scrape_configs"]]
    input_series = [
        {"series": f'up{{job={json.dumps(job)},instance="{job}:1"}}', "values": "1x10"}
        for job in jobs
    ]
    for s in scraped.series:
        labels = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(s.labels.items()))
        cumulative = s.kind in {"counter", "histogram", "summary"}
        # Counters grow by their scraped value each minute; gauges hold it.
        values = f"0+{s.value!r}x10" if cumulative else f"{s.value!r}x10"
        input_series.append({"series": f"{s.name}{{{labels}}}", "values": values})

    def grafana(expr: str) -> str:
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
        return expr

    # absent(E) is empty exactly when E has a sample: each expression must parse,
    # evaluate and give at least one series over what the services export.
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "promql_expr_test": [
                    {"expr": f"absent(({grafana(e)}))", "eval_time": "10m", "exp_samples": []}
                    for e in exprs
                ],
            }
        ],
    }
    (tmp_path / "rules.yml").write_text("groups: []\n")
    (tmp_path / "dashboard_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [promtool, "test", "rules", "dashboard_test.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow  # a whole platform driven and scraped (18 s): keeps the quick run short
@pytest.mark.nats
def test_compose_healthcheck_answers_for_each_service_on_its_host(scraped: Scrape) -> None:
    assert scraped.health == dict.fromkeys(SERVICES, 0)
    assert scraped.health_elsewhere == 1


# -- the files alone -------------------------------------------------------------------------


@pytest.mark.unit
def test_dashboard_queries_the_provisioned_datasource() -> None:
    sources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml").read_text()
    )["datasources"]
    uids = {s["uid"]: s for s in sources}
    assert uids["prometheus"]["url"] == "http://prometheus:9090"
    assert uids["prometheus"]["type"] == "prometheus"
    assert uids["jaeger"]["url"] == "http://jaeger:16686"
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            assert names_in(target["expr"]), target["expr"]


@pytest.mark.unit
def test_grafana_provisions_the_dashboard_directory_compose_mounts() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    providers = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml").read_text()
    )["providers"]
    (path,) = [p["options"]["path"] for p in providers]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/gfaas.json"


@pytest.mark.unit
def test_metric_names_are_found_in_expressions() -> None:
    # The parser the checks above rely on: names, not functions, labels or values.
    expr = 'sum by (function) (rate(gfaas_x_total{outcome!="gfaas_y"}[5m])) / up'
    assert names_in(expr) == {"gfaas_x_total", "up"}
    assert names_in("histogram_quantile(0.9, sum by (le) (rate(gfaas_b_bucket[1m])))") == {
        "gfaas_b_bucket"
    }
