"""The scheduler's books of function instances (services/scheduler/instances.py),
without a bus: what agents' beats say, and what the autoscaler is given."""

from __future__ import annotations

from typing import Any, cast

import msgspec
import pytest

from services.scheduler.instances import Instances, fixed_config, profile_for
from shared.scheduling import autoscale, packing
from shared.scheduling.autoscale import Config, ProfilePoint
from shared.schema import (
    AgentBeat,
    ErrorCode,
    ErrorInfo,
    FunctionSpec,
    InstanceInfo,
    InstanceState,
    Profile,
    ProfileRow,
)

pytestmark = pytest.mark.unit
MB = 1024 * 1024


def info(name: str, state: InstanceState = InstanceState.READY, **kw: Any) -> InstanceInfo:
    values: dict[str, Any] = {
        "instance_id": name,
        "function": "f",
        "sm_share": 0.5,
        "time_quota": 0.5,
        "memory_bytes": 100 * MB,
        "state": state,
    }
    values.update(kw)
    return InstanceInfo(**values)


def beat(*instances: InstanceInfo, agent: str = "a") -> AgentBeat:
    return AgentBeat(
        agent_id=agent,
        node="n",
        device="cpu",
        memory_total=1000 * MB,
        cores=2,
        spatial="cores",
        instances=list(instances),
    )


def books() -> Instances:
    return Instances(bus=cast(Any, None), registry=cast(Any, None), timeout_s=0.5)


def test_an_instance_that_leaves_its_agents_beat_is_lost_and_a_failed_start_said_once() -> None:
    b = books()
    b.observe(beat(info("i1"), info("i2")), now=0.0)
    failed = info(
        "i3", InstanceState.FAILED, error=ErrorInfo(code=ErrorCode.HANDLER_ERROR, reason="x")
    )
    gone, new_failures = b.observe(beat(info("i1"), failed), now=0.1)
    assert gone == ["i2"]
    assert [f.instance_id for f in new_failures] == ["i3"]
    # Reported again next beat: acted on once, and no start for a while.
    _, again = b.observe(beat(info("i1"), failed), now=0.2)
    assert again == []
    assert b.backoff["f"] > 0.2


def test_a_silent_agent_takes_its_instances_with_it() -> None:
    b = books()
    b.observe(beat(info("i1")), now=0.0)
    assert b.expire(now=0.2) == []
    assert b.expire(now=1.0) == ["i1"]
    assert not b.any_agent()


def test_devices_keep_the_packers_rectangles_and_repack_the_unknown() -> None:
    b = books()
    b.rects["i1"] = packing.Rect(50, 0, 50, 50)
    b.observe(beat(info("i1"), info("i2")), now=0.0)
    (device,) = b.devices({})
    rects = {s.demand.instance_id: s.rect for s in device.slots}
    assert rects["i1"] == packing.Rect(50, 0, 50, 50)
    assert not rects["i2"].overlaps(rects["i1"])
    assert device.memory_used == 200 * MB
    assert device.share_used == pytest.approx(0.5)


def test_profile_for_adds_a_fixed_configuration_scaled_from_the_whole_device() -> None:
    spec = FunctionSpec(name="f", handler="m:f", time_quota=0.5)
    assert fixed_config(spec) == Config(1.0, 0.5)
    rows = profile_for(spec, (), exec_ms=10.0)
    assert rows[0] == ProfilePoint(Config(1.0, 1.0), p99_ms=10.0, throughput=100.0)
    assert rows[1] == ProfilePoint(Config(1.0, 0.5), p99_ms=20.0, throughput=50.0)
    # Before any run: a quarter of the SLO.
    assert profile_for(FunctionSpec(name="g", handler="m:g"), (), 0.0)[0].p99_ms == 250.0


def test_an_isolated_agent_makes_every_function_run_as_instances() -> None:
    b = books()
    plain = FunctionSpec(name="p", handler="m:p")
    asks = FunctionSpec(name="q", handler="m:q", min_instances=1)
    b.observe(beat(), now=0.0)
    assert (b.instanced(plain), b.instanced(asks)) == (False, True)
    # A node whose agent has a handler user runs no handler code in its workers.
    b.observe(msgspec.structs.replace(beat(agent="b"), isolated=True), now=0.0)
    assert (b.instanced(plain), b.instanced(asks)) == (True, True)
    assert b.expire(now=1.0) == []
    assert not b.isolated  # its silence ends it


def test_an_unprofiled_function_that_asked_for_no_instances_is_planned_at_parts_of_the_time() -> (
    None
):
    spec = FunctionSpec(name="p", handler="m:p")
    assert len(profile_for(spec, (), exec_ms=10.0)) == 1
    rows = profile_for(spec, (), exec_ms=10.0, shared=True)
    assert rows[1:] == (
        ProfilePoint(Config(1.0, 0.5), p99_ms=20.0, throughput=50.0),
        ProfilePoint(Config(1.0, 0.25), p99_ms=40.0, throughput=25.0),
    )
    # The autoscaler takes the least share that meets the SLO: a quarter of the time,
    # so four such functions share a device as they shared one worker's.
    load = autoscale.FunctionLoad(function="p", rate=1.0, profile=rows, slo_ms=1000.0)
    (config,) = autoscale.scale(load, now=0.0).add
    assert config == Config(1.0, 0.25)


def test_a_learned_profile_replaces_the_default_and_skips_unusable_rows() -> None:
    b = books()
    rows = [
        ProfileRow(sm_share=0.5, time_quota=1.0, p50_ms=1.0, p99_ms=2.0, throughput=400.0),
        ProfileRow(sm_share=0.5, time_quota=0.25, p50_ms=5.0, p99_ms=9.0, throughput=0.0),
        ProfileRow(sm_share=1.5, time_quota=1.0, p50_ms=1.0, p99_ms=2.0, throughput=400.0),
    ]
    b.learn(Profile(function="f", device="cpu", agent="a", rows=rows))
    assert b.profiles["f"] == (ProfilePoint(Config(0.5, 1.0), p99_ms=2.0, throughput=400.0),)
