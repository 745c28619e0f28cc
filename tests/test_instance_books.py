"""The scheduler's books of function instances (services/scheduler/instances.py),
without a bus: what agents' beats say, and what the autoscaler is given."""

from __future__ import annotations

import time
from typing import Any, cast

import msgspec
import numpy as np
import pytest

from services.scheduler.handlers import Scheduler
from services.scheduler.instances import Instances, Observed, fixed_config, profile_for
from shared.config import Settings
from shared.scheduling import autoscale, packing
from shared.scheduling.autoscale import Config, ProfilePoint
from shared.scheduling.base import make_policy
from shared.schema import (
    AgentBeat,
    AgentReply,
    ErrorCode,
    ErrorInfo,
    FunctionSpec,
    InstanceInfo,
    InstanceState,
    Profile,
    ProfileRow,
    encode,
)
from tests.test_scheduler_views import heartbeat, invocation

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


def beat(
    *instances: InstanceInfo, agent: str = "a", host_models: list[str] | None = None
) -> AgentBeat:
    return AgentBeat(
        agent_id=agent,
        node="n",
        device="cpu",
        memory_total=1000 * MB,
        cores=2,
        spatial="cores",
        instances=list(instances),
        host_models=host_models or [],
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
    # Its agent forgets it after a while: so do the books.
    gone, _ = b.observe(beat(info("i1")), now=10.2)
    assert gone == ["i3"]
    assert b.failures_seen == set()


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
        # Not a whole percent: the packer cannot place it.
        ProfileRow(sm_share=0.3333, time_quota=1.0, p50_ms=1.0, p99_ms=2.0, throughput=400.0),
        ProfileRow(sm_share=0.5, time_quota=0.125, p50_ms=9.0, p99_ms=16.0, throughput=50.0),
    ]
    b.learn(Profile(function="f", device="cpu", agent="a", rows=rows))
    assert b.profiles["f"] == (ProfilePoint(Config(0.5, 1.0), p99_ms=2.0, throughput=400.0),)


# -- the autoscaler as the books drive it: measured clusters, the surplus keep-alive ----

# 30 ms alone, an 80 ms SLO: one instance serves 4 req/s, but the second request of
# a cluster 5 ms behind the first is late at one instance far more often than the
# 0.25% budget allows.
SLOW = (ProfilePoint(Config(0.25, 1.0), p99_ms=30.0, throughput=33.0),)


class AgentCommands:
    """A bus whose agents accept every command (and say which they were sent)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def request(self, subject: str, data: bytes, *, timeout: float, **_: Any) -> bytes:
        self.sent.append(subject)
        return encode(AgentReply())


class OneSpec:
    """A registry holding one function spec, at version 1."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec

    def all(self) -> list[FunctionSpec]:
        return [self.spec]

    def version(self, name: str) -> int:
        return 1


def scaling(spec: FunctionSpec, **kw: Any) -> tuple[Instances, AgentCommands]:
    bus = AgentCommands()
    b = Instances(bus=cast(Any, bus), registry=cast(Any, OneSpec(spec)), timeout_s=60.0, **kw)
    b.profiles[spec.name] = SLOW
    return b, bus


def seen() -> Observed:
    return Observed(waiting={}, busy=lambda _: False, exec_ms=lambda _: 0.0, resident={})


def clustered(b: Instances, function: str, clusters: int, start: float = 0.0) -> float:
    """Clusters of 2 requests on average, 5 ms apart, 0.5 s between cluster starts
    (2 req/s); the time of the last."""
    rng = np.random.default_rng(7)
    t = start
    for _ in range(clusters):
        t += float(rng.exponential(0.5))
        at = t
        for k in range(int(rng.geometric(0.5))):
            at += float(rng.exponential(0.005)) if k else 0.0
            b.arrived(function, at)
    return t


@pytest.mark.anyio
async def test_each_function_is_planned_with_its_clusters_as_measured() -> None:
    spec = FunctionSpec(name="f", handler="m:f", slo_ms=80.0, max_instances=8, memory_mb=100)
    b, bus = scaling(spec)
    b.observe(beat(), now=0.0)
    now = clustered(b, "f", 400)
    planned = b.settings_for("f")
    assert planned.burst_mean == pytest.approx(2.0, abs=0.2)
    assert planned.burst_gap_ms == pytest.approx(5.0, abs=1.0)
    # Its rate alone takes one instance (the rule as set: a floor of one request);
    # its clusters, more.
    alone = autoscale.scale(b.load(spec, now, 0, lambda _: False, lambda _: 0.0), now)
    assert len(alone.add) == 1
    (decision,) = await b.scale(now, seen(), only="f")
    assert len(decision.add) >= 2
    assert sum(s.endswith(".start") for s in bus.sent) == len(decision.add)
    assert (b.started, b.refused) == (len(decision.add), 0)
    # The status says what it was planned with.
    clusters = cast(dict[str, Any], b.details()["plans"])["f"]["clusters"]
    assert clusters["mean"] == pytest.approx(2.0, abs=0.2)
    assert clusters["gap_ms"] == pytest.approx(5.0, abs=1.0)
    assert clusters["burst_mean"] == planned.burst_mean
    assert clusters["arrivals"] >= 50


@pytest.mark.anyio
async def test_without_enough_arrivals_the_rule_is_planned_as_set() -> None:
    spec = FunctionSpec(name="f", handler="m:f", slo_ms=80.0, max_instances=8, memory_mb=100)
    b, _ = scaling(spec)
    b.observe(beat(), now=0.0)
    now = clustered(b, "f", 10)
    assert b.settings_for("f") == autoscale.DEFAULT_SETTINGS
    (decision,) = await b.scale(now, seen(), only="f")
    assert len(decision.add) == 1
    assert (b.started, b.refused) == (1, 0)
    assert cast(dict[str, Any], b.details()["plans"])["f"]["clusters"] is None


def idle_ones(b: Instances, n: int, idle_since: float) -> None:
    infos = [info(f"i{k}", sm_share=0.25, time_quota=1.0, version=1) for k in range(n)]
    b.observe(beat(*infos), now=idle_since)
    for k in range(n):
        b.touch(f"i{k}", idle_since)


@pytest.mark.anyio
@pytest.mark.parametrize("surplus", [None, 1.0])
async def test_instances_beyond_the_floor_go_after_the_surplus_keep_alive(
    surplus: float | None,
) -> None:
    # Four idle instances of a function with a trickle of requests (a burst's
    # leftovers): idle 2 s, short of the spec's 30 s keep-alive.
    spec = FunctionSpec(
        name="f", handler="m:f", slo_ms=80.0, idle_s=30.0, max_instances=8, memory_mb=100
    )
    b, bus = scaling(spec, surplus_idle_s=surplus)
    idle_ones(b, 4, idle_since=100.0)
    b.arrived("f", 100.5)
    (decision,) = await b.scale(102.0, seen(), only="f")
    stops = [s for s in bus.sent if s.endswith(".stop")]
    if surplus is None:  # as before: the spec's idle_s for all of them
        assert decision.remove == ()
        assert stops == []
    else:  # down to what the rate needs (one, the floor with no clusters measured)
        assert len(decision.remove) == 3
        assert len(stops) == 3
        assert decision.instances == 1


@pytest.mark.anyio
async def test_the_last_instance_keeps_the_specs_keep_alive() -> None:
    spec = FunctionSpec(
        name="f", handler="m:f", slo_ms=80.0, idle_s=30.0, max_instances=8, memory_mb=100
    )
    b, _ = scaling(spec, surplus_idle_s=1.0)
    idle_ones(b, 1, idle_since=100.0)
    # No rate left (the last request is 5 s past): the surplus keep-alive is not its.
    b.arrived("f", 99.0)
    (decision,) = await b.scale(110.0, seen(), only="f")
    assert decision.remove == ()
    (decision,) = await b.scale(131.0, seen(), only="f")
    assert decision.remove == ("i0",)


def test_the_schedulers_setting_reaches_its_books() -> None:
    def books_of(settings: Settings) -> Instances:
        none = cast(Any, None)
        return Scheduler(none, none, make_policy("locality"), settings).instances

    assert books_of(Settings()).surplus_idle_s is None
    assert books_of(Settings(surplus_idle_s=0.5)).surplus_idle_s == 0.5
    assert books_of(Settings(surplus_idle_s=0.0)).surplus_idle_s == 0.0


@pytest.mark.anyio
@pytest.mark.parametrize("holder", ["a", "b"])
async def test_a_new_instance_goes_where_the_host_tier_holds_its_model(holder: str) -> None:
    """Agents' beats say which deployed models their node's host tier holds
    (AgentBeat.host_models, kept by the prefetcher): the packer starts a function's
    instance on such a node, whichever of two equal ones it is."""
    spec = FunctionSpec(
        name="f", handler="m:f", model="m", slo_ms=80.0, max_instances=1, memory_mb=100
    )
    b, bus = scaling(spec)
    for agent in ("a", "b"):
        held = ["m"] if agent == holder else []
        b.observe(beat(agent=agent, host_models=held), now=0.0)
    (decision,) = await b.scale(0.1, seen_waiting("f"), only="f")
    assert len(decision.add) == 1
    starts = [s for s in bus.sent if s.endswith(".start")]
    assert starts == [f"gfaas.v1.agent.{holder}.start"], starts


def seen_waiting(function: str) -> Observed:
    return Observed(waiting={function: 1}, busy=lambda _: False, exec_ms=lambda _: 0.0, resident={})


class SchedulerBus(AgentCommands):
    """AgentCommands, and what the scheduler publishes and answers callers."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[tuple[str, ErrorCode]] = []
        self.reasons: list[str] = []

    async def publish(self, subject: str, data: bytes, **_: Any) -> None:
        pass

    async def reply_error(
        self, subject: str, invocation_id: str, code: ErrorCode, reason: str
    ) -> None:
        self.errors.append((invocation_id, code))
        self.reasons.append(reason)


class SyncedSpec(OneSpec):
    """OneSpec read through (the tick stops orphans and prunes the books by it)."""

    synced = True

    @property
    def specs(self) -> dict[str, FunctionSpec]:
        return {self.spec.name: self.spec}


@pytest.mark.anyio
async def test_a_function_redeployed_off_instances_is_no_longer_unplaced() -> None:
    """An instanced function no device had room for, redeployed to run on the shared
    workers: what waits for a worker of it is not answered `overloaded` for the
    instances it no longer has (its last round's `unplaced` reason stayed in the
    books, never planned again)."""
    registry = SyncedSpec(FunctionSpec(name="f", handler="m:f", min_instances=1, memory_mb=5000))
    bus = SchedulerBus()
    scheduler = Scheduler(
        cast(Any, bus), cast(Any, registry), make_policy("least_loaded"), Settings()
    )
    await scheduler.agent_beat(beat())  # 1000 MB: no room for 5000
    await scheduler.tick()
    assert "f" in scheduler.instances.unplaced
    assert "f" in scheduler.instances.last
    registry.spec = FunctionSpec(name="f", handler="m:f", memory_mb=100)
    # Its one worker is busy; the next call waits for it.
    now = time.monotonic()
    scheduler.state.observe(msgspec.structs.replace(heartbeat("w0"), capacity=1), now)
    scheduler.state.assign("w0", invocation(scheduler.state, 0, registry.spec, now), now)
    scheduler.state.enqueue(invocation(scheduler.state, 1, registry.spec, now))
    await scheduler.tick()
    assert bus.errors == []
    assert list(scheduler.state.pending) == ["i1"]
    assert scheduler.instances.unplaced == {}
    assert "f" not in scheduler.instances.last  # nor its instances' plan in the status


class RefusingAgents(SchedulerBus):
    """SchedulerBus whose agents in `refusing` refuse every start, as an agent with
    no room by its own books does (the others accept)."""

    def __init__(self, *refusing: str) -> None:
        super().__init__()
        self.refusing = set(refusing)

    async def request(self, subject: str, data: bytes, *, timeout: float, **_: Any) -> bytes:
        self.sent.append(subject)
        agent = subject.split(".")[-2]
        if subject.endswith(".start") and agent in self.refusing:
            reason = f"f: 100 MiB would overcommit cpu of {agent} (0 of 1000 MiB free)"
            return encode(AgentReply(error=ErrorInfo(code=ErrorCode.OVERLOADED, reason=reason)))
        return encode(AgentReply())


def starts(bus: AgentCommands) -> list[str]:
    return [s.split(".")[-2] for s in bus.sent if s.endswith(".start")]


@pytest.mark.anyio
async def test_a_start_its_agent_refuses_goes_to_another_device() -> None:
    """The packer's first choice refuses the start (its agent's books differ from the
    scheduler's): the instance is started on the next device that fits, and the
    refusing one is not asked again at once."""
    spec = FunctionSpec(name="f", handler="m:f", max_instances=1, memory_mb=100)
    bus = RefusingAgents("a")
    b = Instances(bus=cast(Any, bus), registry=cast(Any, OneSpec(spec)), timeout_s=60.0)
    # "a" holds its model in the host tier: the packer's first choice.
    b.observe(beat(agent="a", host_models=["f"]), now=0.0)
    b.observe(beat(agent="b"), now=0.0)
    await b.scale(0.1, seen_waiting("f"), only="f")
    assert starts(bus) == ["a", "b"]
    assert [c.agent for c in b.commanded.values()] == ["b"]
    assert b.unplaced == {}
    # Its instance gone (never heard from b), the next start passes "a" over a while.
    b.commanded.clear()
    await b.scale(0.2, seen_waiting("f"), only="f")
    assert starts(bus) == ["a", "b", "b"]


@pytest.mark.anyio
async def test_callers_waiting_on_starts_every_agent_refuses_are_answered_with_why() -> None:
    """Scale from zero where every agent refuses the start: the calls waiting for the
    function are answered `overloaded` with the agents' reason at once (not at their
    deadline), and the agents are not sent the same start every tick meanwhile."""
    spec = FunctionSpec(name="f", handler="m:f", max_instances=1, memory_mb=100)
    registry = SyncedSpec(spec)
    bus = RefusingAgents("a", "b")
    scheduler = Scheduler(
        cast(Any, bus), cast(Any, registry), make_policy("least_loaded"), Settings()
    )
    await scheduler.agent_beat(beat(agent="a"))
    await scheduler.agent_beat(beat(agent="b"))
    now = time.monotonic()
    scheduler.state.enqueue(invocation(scheduler.state, 0, spec, now))
    await scheduler.tick()
    assert sorted(starts(bus)) == ["a", "b"]
    assert bus.errors == [("i0", ErrorCode.OVERLOADED)]
    (reason,) = bus.reasons
    assert "no device has room for an instance of 'f'" in reason
    assert "would overcommit cpu of a" in reason
    assert "would overcommit cpu of b" in reason
    # The next ticks (within the back-off) command no start either agent refused.
    scheduler.state.enqueue(invocation(scheduler.state, 1, spec, now))
    await scheduler.tick()
    assert sorted(starts(bus)) == ["a", "b"]
    assert bus.errors[-1] == ("i1", ErrorCode.OVERLOADED)


class SlowAgent(AgentCommands):
    """Agents that start what they are sent, the first start answered too late (the
    agent busy, or the reply lost): it was started all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.late = 1

    async def request(self, subject: str, data: bytes, *, timeout: float, **_: Any) -> bytes:
        self.sent.append(subject)
        if subject.endswith(".start") and self.late:
            self.late -= 1
            raise TimeoutError(f"no reply on {subject} within {timeout:.3f}s")
        return encode(AgentReply())


@pytest.mark.anyio
async def test_a_start_answered_too_late_is_not_started_again_beside_itself() -> None:
    """A start whose answer did not come in time may have been done: it stays in the
    books as commanded (until its agent's beat lists it, or START_LOST_S), and the
    next round does not start a second instance for the same plan entry."""
    spec = FunctionSpec(name="f", handler="m:f", max_instances=1, memory_mb=100)
    bus = SlowAgent()
    b = Instances(
        bus=cast(Any, bus), registry=cast(Any, OneSpec(spec)), timeout_s=60.0, clock=lambda: 0.1
    )
    b.observe(beat(), now=0.0)
    await b.scale(0.1, seen_waiting("f"), only="f")
    assert starts(bus) == ["a"]
    (name,) = b.commanded
    await b.scale(0.2, seen_waiting("f"), only="f")
    assert starts(bus) == ["a"]
    # Its agent's beat lists it: one instance, and still no other start.
    started = info(name, InstanceState.STARTING, sm_share=1.0, time_quota=1.0, version=1)
    b.observe(beat(started), now=0.3)
    await b.scale(0.4, seen_waiting("f"), only="f")
    assert starts(bus) == ["a"]
    assert [i.instance_id for _, i in b.instances_of("f")] == [name]


@pytest.mark.anyio
async def test_a_start_answered_too_late_and_never_done_is_forgotten_in_time() -> None:
    spec = FunctionSpec(name="f", handler="m:f", max_instances=1, memory_mb=100)
    bus = SlowAgent()
    b = Instances(
        bus=cast(Any, bus), registry=cast(Any, OneSpec(spec)), timeout_s=60.0, clock=lambda: 0.1
    )
    b.observe(beat(), now=0.0)
    await b.scale(0.1, seen_waiting("f"), only="f")
    b.observe(beat(), now=5.0)  # not listed: not started (yet)
    assert len(b.commanded) == 1
    b.observe(beat(), now=11.0)
    assert b.expire(now=11.0) == []
    assert b.commanded == {}
    await b.scale(11.1, seen_waiting("f"), only="f")
    assert starts(bus) == ["a", "a"]


@pytest.mark.anyio
async def test_a_call_from_zero_waits_for_the_room_an_instance_stopping_frees() -> None:
    """Scaled to zero, its last instance drains and exits (its room held meanwhile)
    when a call comes: the call waits for that room, as the new version of a
    redeploy waits for the old one's, rather than hear `overloaded` (no device has
    room) for a moment's overlap; the start goes once the instance has gone."""
    spec = FunctionSpec(name="f", handler="m:f", max_instances=1, idle_s=1.0, memory_mb=100)
    bus = SchedulerBus()
    scheduler = Scheduler(
        cast(Any, bus), cast(Any, SyncedSpec(spec)), make_policy("least_loaded"), Settings()
    )
    stopping = info("a-1", InstanceState.STOPPING, sm_share=1.0, time_quota=1.0, version=1)
    await scheduler.agent_beat(beat(stopping))
    scheduler.state.enqueue(invocation(scheduler.state, 0, spec, time.monotonic()))
    await scheduler.tick()
    assert bus.errors == []
    assert "f" not in scheduler.instances.unplaced
    assert list(scheduler.state.pending) == ["i0"]
    await scheduler.agent_beat(beat())  # it has gone
    await scheduler.tick()
    assert starts(bus) == ["a"]
    assert bus.errors == []


@pytest.mark.anyio
async def test_what_fits_nowhere_even_once_stopping_instances_go_is_still_answered() -> None:
    spec = FunctionSpec(name="f", handler="m:f", max_instances=1, memory_mb=5000)
    bus = SchedulerBus()
    scheduler = Scheduler(
        cast(Any, bus), cast(Any, SyncedSpec(spec)), make_policy("least_loaded"), Settings()
    )
    stopping = info("a-1", InstanceState.STOPPING, sm_share=1.0, time_quota=1.0, version=1)
    await scheduler.agent_beat(beat(stopping))  # 1000 MB: no room for 5000 in any case
    scheduler.state.enqueue(invocation(scheduler.state, 0, spec, time.monotonic()))
    await scheduler.tick()
    assert bus.errors == [("i0", ErrorCode.OVERLOADED)]
