"""`gfaas status` reads as a table: one line per instance, the figures that matter."""

from __future__ import annotations

import pytest

from gfaas.status_view import summary, table

pytestmark = pytest.mark.unit


def test_a_scheduler_says_whether_it_is_active_and_what_it_holds() -> None:
    text = summary(
        "scheduler",
        {"active": True, "policy": "locality", "workers": {"w0": {}}, "pending": 2, "assigned": 9},
    )
    assert text == "active, policy locality, 1 workers, 2 queued, 9 placed"
    assert summary("scheduler", {"active": False}).startswith("standby")


def test_a_worker_and_an_ingress_show_their_load() -> None:
    worker = {"device": "cpu", "inflight": 1, "completed": 5, "failed": 0, "models": ["m"]}
    assert summary("gpu-worker", worker) == "cpu, 1 running, 5 done, 0 failed, models m"
    ingress = {"accepted": 3, "async": {"completed": 2, "retried": 1}, "functions": ["a"]}
    assert "3 accepted" in summary("ingress", ingress)
    assert "async 2 done / 1 retried / 0 dead" in summary("ingress", ingress)


def test_an_agent_shows_its_weights_and_the_instances_sharing_them() -> None:
    mib = 1024 * 1024
    agent = {
        "instances": [{}, {}, {}],
        "memory_used": 300 * mib,
        "memory_total": 1024 * mib,
        "spatial": "cores",
        "shares_weights": True,
        "weights": {
            "m100": {"bytes": 100 * mib, "instances": 2},
            "m10": {"bytes": 10 * mib, "instances": 1},
        },
    }
    worker = {"device": "cpu", "models": [], "agent": agent}
    assert summary("gpu-worker", worker).endswith(
        "; agent: 3 instances, 300 of 1024 MiB, spatial cores; "
        "weights (shared) m10 10 MiB x1, m100 100 MiB x2"
    )


def test_a_broker_shows_its_pool_and_its_links() -> None:
    broker = {
        "leases": 3,
        "bytes_leased": 48 * 1024 * 1024,
        "spilled_now": 1,
        "copies": 7,
        "links": {"cpu->emu:0": {"bytes": 64 * 1024 * 1024, "utilisation": 0.25}},
    }
    assert summary("memory-broker", broker) == (
        "3 leases, 48 MiB leased, 1 spilled, 7 copies; links cpu->emu:0 64 MiB at 25%"
    )
    assert summary("memory-broker", {}).endswith("links -")


def test_the_table_aligns_its_columns_and_says_when_nobody_answered() -> None:
    rows = [("scheduler", "host-1-ab", 12.0, "active"), ("gpu-worker", "w0", 3.0, "cpu")]
    lines = table(rows).splitlines()
    assert lines[0].split() == ["service", "instance", "up", "status"]
    assert lines[1].index("host-1-ab") == lines[2].index("w0")
    assert table([]) == "no service answered"
