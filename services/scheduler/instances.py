"""Function instances: the scheduler's side of scaling them (issue 8).

Node agents say what their devices hold (`AgentBeat`); instances heartbeat as
workers that serve one function. Every tick, and at once when a request finds its
function with no instance (scale from zero), each instanced function's observed
rate, profile and SLO go to the pure autoscaler (shared.scheduling.autoscale),
and the instances it adds are placed by 2-D packing (shared.scheduling.packing)
over the agents' devices, then started by a command to that agent; those it
removes are stopped (they drain first). Routing across live instances stays with
the scheduler's policy: an instance is a worker the policy sees.

Each function's burst floor is planned with its request clusters as measured from
its arrivals (shared.scheduling.clusters, as the simulator measures them), and an
instance beyond the floor goes after `surplus_idle_s` idle where that is set (the
spec's `idle_s` stays the keep-alive of the last ones).

This module keeps the books and does the I/O; the decisions are the pure policies'.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio

from shared import subjects
from shared.bus import Bus
from shared.errors import described
from shared.logs import get_logger
from shared.registry import Registry
from shared.scheduling import autoscale, packing
from shared.scheduling.autoscale import (
    DEFAULT_SETTINGS,
    AutoscaleSettings,
    Config,
    FunctionLoad,
    ProfilePoint,
    ScaleDecision,
)
from shared.scheduling.clusters import ClusterEstimator, shaped
from shared.schema import (
    AgentBeat,
    AgentReply,
    ErrorCode,
    ErrorInfo,
    FunctionSpec,
    InstanceInfo,
    InstanceState,
    Profile,
    StartInstance,
    StopInstance,
    decode,
    encode,
)
from shared.spec import wants_instances

log = get_logger("scheduler")

MB = 1024 * 1024
# The observed request rate is over this long a window.
RATE_WINDOW_S = 5.0
# After an instance of a function failed to start, no other is started for this long.
FAILED_BACKOFF_S = 2.0
# After an agent refused a start of a function (`overloaded`: no room by its own
# books, or a share it cannot give), its device is passed over for that function's
# starts this long: they go to other devices, and with none left the calls waiting
# for it are answered why, not the same start sent again every tick.
REFUSED_BACKOFF_S = 2.0
# How long an agent's command may take to be answered.
COMMAND_TIMEOUT_S = 2.0
# An instance commanded but not yet in its agent's beat is forgotten after this long.
START_LOST_S = 10.0
# Configurations one round may try for a function before it says none fits.
MAX_AVOIDED = 8


@dataclass
class AgentBook:
    beat: AgentBeat
    last_seen: float


@dataclass(frozen=True)
class Commanded:
    """An instance started by this scheduler and not yet in its agent's beat."""

    info: InstanceInfo
    agent: str
    since: float


@dataclass(frozen=True)
class Observed:
    """What the scheduler's books say, for one autoscaling round."""

    waiting: dict[str, int]  # invocations queued, by function
    busy: Callable[[str], bool]  # is this instance running anything?
    exec_ms: Callable[[str], float]  # a function's observed execution time
    # agent -> models its device holds (a function without one stands for itself)
    resident: dict[str, frozenset[str]]


@dataclass
class Instances:
    bus: Bus
    registry: Registry[FunctionSpec]
    # An agent silent this long is gone, and its instances with it (as for a worker:
    # Settings.worker_timeout_s).
    timeout_s: float
    clock: Callable[[], float] = time.monotonic
    # Model -> bytes of its weights (the scheduler's books, filled from the store and
    # heartbeats): what instances of it may share on a device that shares weights.
    model_bytes: dict[str, int] = field(default_factory=dict)
    agents: dict[str, AgentBook] = field(default_factory=dict)
    commanded: dict[str, Commanded] = field(default_factory=dict)
    # Where the packer put each instance (its rectangle of the device).
    rects: dict[str, packing.Rect] = field(default_factory=dict)
    arrivals: dict[str, deque[float]] = field(default_factory=dict)
    # Function -> its request clusters, measured from the same arrivals.
    clusters: dict[str, ClusterEstimator] = field(default_factory=dict)
    # The plan rule, each function's measured clusters put in (`settings_for`).
    settings: AutoscaleSettings = DEFAULT_SETTINGS
    # Idle seconds after which an instance beyond the burst floor goes while its
    # function has a rate (None: the spec's idle_s, as the last ones).
    surplus_idle_s: float | None = None
    # Instance -> when it last finished or was given a request (idle since then).
    used: dict[str, float] = field(default_factory=dict)
    # Function -> until when no instance of it is started (one failed to start).
    backoff: dict[str, float] = field(default_factory=dict)
    # (function, agent) -> until when starts of it pass that agent's device over, and
    # why the agent refused the last one (REFUSED_BACKOFF_S).
    refusals: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    # Failed starts already acted on (an agent reports one for several beats).
    failures_seen: set[str] = field(default_factory=set)
    # Measured profiles (`gfaas profile`), by function.
    profiles: dict[str, tuple[ProfilePoint, ...]] = field(default_factory=dict)
    profiling: set[str] = field(default_factory=set)  # asked for once each
    best_p99: dict[str, float] = field(default_factory=dict)  # over its profile's rows
    last: dict[str, ScaleDecision] = field(default_factory=dict)
    started: int = 0
    stopped: int = 0
    refused: int = 0
    # Function -> why no device had room for an instance of it (this round).
    unplaced: dict[str, str] = field(default_factory=dict)
    _said: dict[tuple[str, str], str] = field(default_factory=dict)
    _round: anyio.Lock = field(default_factory=anyio.Lock)

    # -- what is heard ------------------------------------------------------------------

    def arrived(self, function: str, now: float) -> None:
        times = self.arrivals.setdefault(function, deque())
        times.append(now)
        self.clusters.setdefault(function, ClusterEstimator()).add(now)
        while times and times[0] < now - RATE_WINDOW_S:
            times.popleft()

    def rate(self, function: str, now: float) -> float:
        times = self.arrivals.get(function)
        if not times:
            return 0.0
        while times and times[0] < now - RATE_WINDOW_S:
            times.popleft()
        return len(times) / RATE_WINDOW_S

    def settings_for(self, function: str) -> AutoscaleSettings:
        """The plan rule for `function`: its clusters as measured so far as the burst
        model (the rule as set until there are enough arrivals to tell)."""
        estimator = self.clusters.get(function)
        return shaped(self.settings, estimator.held() if estimator is not None else None)

    def touch(self, instance_id: str, now: float) -> None:
        if instance_id in self.used or self.known(instance_id):
            self.used[instance_id] = now

    def known(self, instance_id: str) -> bool:
        return instance_id in self.commanded or any(
            i.instance_id == instance_id for a in self.agents.values() for i in a.beat.instances
        )

    def observe(self, beat: AgentBeat, now: float) -> tuple[list[str], list[InstanceInfo]]:
        """An agent's beat: the instances it no longer runs (lost, for the scheduler
        to reap), and the failed starts not acted on yet."""
        before = self.agents.get(beat.agent_id)
        had = {i.instance_id for i in before.beat.instances} if before is not None else set()
        self.agents[beat.agent_id] = AgentBook(beat, now)
        listed = {i.instance_id for i in beat.instances}
        for name in listed:
            self.commanded.pop(name, None)
        gone = sorted(had - listed)
        for name in gone:
            self._forget(name)
        failed = [
            i
            for i in beat.instances
            if i.state is InstanceState.FAILED and i.instance_id not in self.failures_seen
        ]
        for info in failed:
            self.failures_seen.add(info.instance_id)
            self.backoff[info.function] = now + FAILED_BACKOFF_S
        return gone, failed

    def expire(self, now: float) -> list[str]:
        """Agents gone silent, and commands never confirmed: the instances lost."""
        lost: list[str] = []
        timeout = self.timeout_s
        for agent_id, book in list(self.agents.items()):
            if now - book.last_seen > timeout:
                log.warning("agent.lost", agent=agent_id, instances=len(book.beat.instances))
                del self.agents[agent_id]
                for info in book.beat.instances:
                    lost.append(info.instance_id)
                    self._forget(info.instance_id)
        for name, cmd in list(self.commanded.items()):
            if now - cmd.since > START_LOST_S or cmd.agent not in self.agents:
                del self.commanded[name]
                self._forget(name)
        return lost

    def _forget(self, name: str) -> None:
        self.rects.pop(name, None)
        self.used.pop(name, None)
        # Its failure is no longer in any beat: kept, it would outlive the instance,
        # one entry per failed start for the scheduler's lifetime.
        self.failures_seen.discard(name)

    def learn(self, profile: Profile) -> None:
        """A measured profile (`gfaas profile`, or the one after a deploy)."""
        rows = []
        for r in profile.rows:
            try:
                config = Config(r.sm_share, r.time_quota)
                # Only whole percents can be placed (packing.units): a row of 2 of 3
                # cores (0.6667), stored by a profiler before it left them out, was
                # the least share, and every plan that chose it raised in the packer.
                packing.units(r.sm_share)
                packing.units(r.time_quota)
            except ValueError:
                continue
            if r.throughput > 0.0:
                rows.append(ProfilePoint(config, p99_ms=r.p99_ms, throughput=r.throughput))
        if rows:
            self.profiles[profile.function] = tuple(rows)
            log.info("profile.learned", function=profile.function, rows=len(rows))

    def unmeetable(self, spec: FunctionSpec) -> str | None:
        """Why a request for `spec` is refused at once: its spec says to reject when no
        configuration meets its SLO, and the last plan found none; else None."""
        plan = self.last.get(spec.name)
        if spec.slo_unmeetable != "reject" or plan is None or not plan.slo_unmeetable:
            return None
        best = self.best_p99.get(spec.name, math.inf)
        return (
            f"no configuration of {spec.name!r} meets its SLO of {spec.slo_ms:g} ms on "
            f"this platform's devices (the best p99 measured is {best:g} ms)"
        )

    def unprofiled(self) -> list[str]:
        """Instanced functions with declared inputs and no profile, not yet asked for."""
        out = [
            s.name
            for s in self.registry.all()
            if self.instanced(s)
            and s.inputs
            and s.name not in self.profiles
            and s.name not in self.profiling
        ]
        self.profiling.update(out)
        return out

    # -- the books as the policies see them ---------------------------------------------

    def instances_of(self, function: str) -> list[tuple[str, InstanceInfo]]:
        """(agent, instance) for every instance of `function` that is starting or
        ready, commanded ones included."""
        out = [
            (agent_id, info)
            for agent_id, book in self.agents.items()
            for info in book.beat.instances
            if info.function == function
            and info.state in (InstanceState.STARTING, InstanceState.READY)
        ]
        out += [(c.agent, c.info) for c in self.commanded.values() if c.info.function == function]
        return out

    def current(self, spec: FunctionSpec) -> list[tuple[str, InstanceInfo]]:
        """Instances of `spec` as deployed now (its version); the others are old."""
        version = self.registry.version(spec.name)
        return [(a, i) for a, i in self.instances_of(spec.name) if i.version == version]

    async def retire_old(self, spec: FunctionSpec, now: float) -> None:
        """A redeploy: instances of the earlier version serve until one of the new
        version is ready, then drain and go (no call fails for the change); one the
        new version never replaced goes after idle_s, as any idle instance."""
        version = self.registry.version(spec.name)
        ready = any(i.state is InstanceState.READY for _, i in self.current(spec))
        for _, info in self.instances_of(spec.name):
            if info.version == version:
                continue
            idle = now - self.used.setdefault(info.instance_id, now) >= spec.idle_s
            if ready or idle:
                log.info("instance.outdated", instance=info.instance_id, version=info.version)
                await self.stop(info.instance_id)

    @property
    def isolated(self) -> bool:
        """Does some node run handler code only in instances (its agent's beat says
        so: it has a handler user)? Then every function runs as instances, wherever it
        is placed: the workers of such a node take no runs themselves."""
        return any(book.beat.isolated for book in self.agents.values())

    def instanced(self, spec: FunctionSpec) -> bool:
        """Does `spec` run as instances here: its spec asks (shared.spec.wants_instances),
        or a node isolates handler code."""
        return wants_instances(spec) or self.isolated

    def any_agent(self) -> bool:
        return bool(self.agents)

    def devices(
        self, resident: dict[str, frozenset[str]], *, stopping: bool = True
    ) -> list[packing.Device]:
        """Each agent's device with its instances in their rectangles (re-packed in
        start order where this scheduler did not place them: after a failover).
        `stopping` False: as they will be once the instances stopping have gone."""
        gone = {InstanceState.FAILED}
        if not stopping:
            gone.add(InstanceState.STOPPING)
        devices = []
        for agent_id, book in self.agents.items():
            infos = [i for i in book.beat.instances if i.state not in gone]
            infos += [c.info for c in self.commanded.values() if c.agent == agent_id]
            device = packing.Device(
                device_id=agent_id,
                memory_total=book.beat.memory_total,
                node=book.beat.node,
                device_models=resident.get(agent_id, frozenset()),
                host_models=frozenset(book.beat.host_models),
                shares_weights=book.beat.shares_weights,
            )
            for info in infos:
                demand = _demand(info)
                rect = self.rects.get(info.instance_id)
                if rect is not None:
                    slots = (*device.slots, packing.Slot(demand, rect))
                    device = packing.Device(
                        device_id=device.device_id,
                        memory_total=device.memory_total,
                        node=device.node,
                        slots=slots,
                        device_models=device.device_models,
                        host_models=device.host_models,
                        shares_weights=device.shares_weights,
                    )
                    continue
                placed = packing.add(device, demand)
                if isinstance(placed, packing.Device):
                    device = placed
            devices.append(device)
        return devices

    # -- deciding and doing -------------------------------------------------------------

    async def scale(
        self, now: float, seen: Observed, only: str | None = None
    ) -> list[ScaleDecision]:
        """One round of the autoscaler over every instanced function (or `only`),
        carried out: starts commanded, stops sent."""
        if not self.agents or self._round.locked():
            return []  # a round is under way; it sees what this one would
        async with self._round:
            return await self._scale(now, seen, only)

    async def _scale(self, now: float, seen: Observed, only: str | None) -> list[ScaleDecision]:
        if only is None:
            await self._stop_orphans()
            # A function removed, or redeployed to run on the shared workers, is not
            # planned again: its last round's `unplaced` reason and plan would stay,
            # and the scheduler answer what waits for it `overloaded` every tick (no
            # instance, "no room") though workers serve it now.
            planned = {s.name for s in self.registry.all() if self.instanced(s)}
            for name in [n for n in self.unplaced if n not in planned]:
                del self.unplaced[name]
            for name in [n for n in self.last if n not in planned]:
                del self.last[name]
        decisions = []
        for spec in self.registry.all():
            if not self.instanced(spec) or (only is not None and spec.name != only):
                continue
            try:
                decisions.append(await self._scale_one(spec, now, seen))
            except Exception as exc:
                # One function the autoscaler cannot plan (a spec from before a check
                # existed, say) costs its own round, not every other function's.
                reason = f"its autoscaler round failed: {described(exc)}"
                self.unplaced[spec.name] = reason
                self._say(spec.name, "plan_failed", reason)
        return decisions

    async def _scale_one(self, spec: FunctionSpec, now: float, seen: Observed) -> ScaleDecision:
        await self.retire_old(spec, now)
        return await self._decide(spec, now, seen)

    async def _decide(self, spec: FunctionSpec, now: float, seen: Observed) -> ScaleDecision:
        """The autoscaler's decision for one function, carried out. A configuration no
        device has room for is avoided and the decision made again, so a function
        never waits on a configuration that cannot be placed while another could."""
        avoid: set[Config] = set()
        reason = ""
        # Would one of the configurations avoided fit once the instances stopping now
        # (draining, then exiting) have gone? Then what waits for the function waits
        # for that room, rather than hear that there is none.
        freed = False
        while True:
            load = self.load(spec, now, seen.waiting.get(spec.name, 0), seen.busy, seen.exec_ms)
            decision = autoscale.scale(
                dataclasses.replace(load, avoid=frozenset(avoid)), now, self.settings_for(spec.name)
            )
            self.best_p99[spec.name] = min(p.p99_ms for p in load.profile)
            if decision.add and self.backoff.get(spec.name, 0.0) > now:
                decision = _without_adds(decision)
            self.last[spec.name] = decision
            if decision.slo_unmeetable:
                # Said once; served best effort, or refused (`unmeetable`) as the
                # spec says.
                self._say(
                    spec.name, "slo_unmeetable", f"SLO {spec.slo_ms:g} ms, {spec.slo_unmeetable}"
                )
                if spec.slo_unmeetable == "reject":
                    decision = _without_adds(decision)
            refused = await self._carry_out(spec, decision, seen.resident, now)
            if refused is None:
                if decision.add or not avoid or freed:
                    self.unplaced.pop(spec.name, None)
                else:  # what it wanted fits nowhere, and nothing else would do
                    self.unplaced[spec.name] = reason
                return decision
            config, reason = refused
            if await self._make_way(spec):
                return decision  # the next round places the new version
            freed = freed or self._fits_once_stopped(spec, config, seen.resident, now)
            if config in avoid or len(avoid) >= MAX_AVOIDED:
                if freed:
                    self.unplaced.pop(spec.name, None)
                else:
                    self.unplaced[spec.name] = reason
                    self._say(spec.name, "unplaced", reason)
                return decision
            avoid.add(config)

    def _fits_once_stopped(
        self, spec: FunctionSpec, config: Config, resident: dict[str, frozenset[str]], now: float
    ) -> bool:
        """Would an instance of `spec` in `config` fit once the instances stopping now
        have drained and exited? (Scaled to zero, its last one holds its room for that
        long: a call that comes meanwhile waits for it.)"""
        devices = self.devices(resident, stopping=False)
        placed = packing.place(devices, self._demand(spec, config), self._refusing(spec.name, now))
        return isinstance(placed, packing.Placement)

    async def _make_way(self, spec: FunctionSpec) -> bool:
        """No room for an instance of the new version beside the old ones: those go
        now (they finish what they run; what comes meanwhile waits for the new one
        in the queue rather than fail). True when any was stopped."""
        version = self.registry.version(spec.name)
        old = [i for _, i in self.instances_of(spec.name) if i.version != version]
        for info in old:
            log.info("instance.outdated", instance=info.instance_id, version=info.version)
            await self.stop(info.instance_id)
        # One stopped already still holds its room until it has drained and exited: the
        # new version waits for that too, rather than its callers hearing `overloaded`
        # (an instance that keeps serving its own version until then: a code bundle).
        draining = any(
            i.function == spec.name and i.version != version and i.state is InstanceState.STOPPING
            for book in self.agents.values()
            for i in book.beat.instances
        )
        return bool(old) or draining

    async def _stop_orphans(self) -> None:
        """Instances of a function removed (or no longer run as instances) go."""
        if not self.registry.synced:
            return  # not yet the whole registry: every function would look removed
        specs = self.registry.specs
        for _, book in list(self.agents.items()):
            for info in book.beat.instances:
                spec = specs.get(info.function)
                wanted = spec is not None and self.instanced(spec)
                if not wanted and info.state in (InstanceState.STARTING, InstanceState.READY):
                    log.info("instance.orphaned", instance=info.instance_id, function=info.function)
                    await self.stop(info.instance_id)

    def _say(self, function: str, what: str, reason: str) -> None:
        """A warning once per function and reason, not once a tick."""
        if self._said.get((function, what)) != reason:
            self._said[(function, what)] = reason
            log.warning(f"instances.{what}", function=function, reason=reason)

    def load(
        self,
        spec: FunctionSpec,
        now: float,
        waiting: int,
        busy: Callable[[str], bool],
        exec_ms: Callable[[str], float],
    ) -> FunctionLoad:
        fixed = fixed_config(spec)
        instances = []
        for _, info in self.current(spec):
            starting = info.state is not InstanceState.READY
            idle_since = self.used.setdefault(info.instance_id, now)
            last = now if starting or busy(info.instance_id) else idle_since
            instances.append(
                autoscale.Instance(
                    instance_id=info.instance_id,
                    config=Config(info.sm_share, info.time_quota),
                    last_used=last,
                )
            )
        return FunctionLoad(
            function=spec.name,
            rate=self.rate(spec.name, now),
            profile=profile_for(
                spec,
                self.profiles.get(spec.name, ()),
                exec_ms(spec.name),
                shared=not wants_instances(spec),
            ),
            slo_ms=spec.slo_ms,
            min_instances=spec.min_instances,
            max_instances=spec.max_instances or 100,
            idle_s=spec.idle_s,
            surplus_idle_s=self.surplus_idle_s,
            fixed=fixed,
            instances=tuple(instances),
            waiting=waiting,
        )

    async def _carry_out(
        self,
        spec: FunctionSpec,
        decision: ScaleDecision,
        resident: dict[str, frozenset[str]],
        now: float,
    ) -> tuple[Config, str] | None:
        """Stops and starts; the configuration no device had room for, and why. A
        start its agent refuses goes to the next device that fits (the refusing one
        passed over for a while); with none left, that is the configuration's reason.
        A start that failed otherwise is tried again next round."""
        for name in decision.remove:
            await self.stop(name)
        if not decision.add:
            return None
        devices = self.devices(resident)
        for config in decision.add:
            demand = self._demand(spec, config)
            while True:  # each refusal passes one more device over: at most one each
                placed = packing.place(devices, demand, self._refusing(spec.name, now))
                if isinstance(placed, packing.Refused):
                    self.refused += 1
                    return config, placed.reason
                name = f"{placed.device_id}-{secrets.token_hex(3)}"
                slot = placed.device.slots[-1]
                self.rects[name] = slot.rect
                error = await self.start(placed.device_id, name, spec, config, slot.rect)
                if error is None:
                    devices = [
                        placed.device if d.device_id == placed.device_id else d for d in devices
                    ]
                    break
                if error.code is not ErrorCode.OVERLOADED:
                    # Not a refusal (no room by its agent's books) but a start that
                    # failed there (its process could not start, no agent answers):
                    # the next round tries again.
                    break
                until = now + REFUSED_BACKOFF_S
                self.refusals[(spec.name, placed.device_id)] = (until, error.reason)
        return None

    def _refusing(self, function: str, now: float) -> dict[str, str]:
        """Agents whose refusal of a start of `function` still stands, and why (the
        lapsed ones leave the books)."""
        for key in [k for k, (until, _) in self.refusals.items() if until <= now]:
            del self.refusals[key]
        return {a: why for (f, a), (_, why) in self.refusals.items() if f == function}

    def _demand(self, spec: FunctionSpec, config: Config) -> packing.Demand:
        """An instance of `spec` in `config`, to place."""
        return packing.Demand(
            instance_id="",
            function=spec.name,
            model=spec.model or spec.name,
            config=config,
            memory=spec.memory_mb * MB,
            weights=self._weights(spec),
        )

    def _weights(self, spec: FunctionSpec) -> int:
        """Bytes of the function's model weights, as far as known (0: none, or not
        sized yet, which counts the instance's whole budget)."""
        return self.model_bytes.get(spec.model, 0) if spec.model else 0

    async def start(
        self, agent_id: str, name: str, spec: FunctionSpec, config: Config, rect: packing.Rect
    ) -> ErrorInfo | None:
        """The start commanded; why not, when its agent refused it or failed it (or
        is gone). One its agent did not answer in time counts as commanded."""
        version = self.registry.version(spec.name)
        command = StartInstance(
            instance_id=name,
            function=spec.name,
            sm_share=config.sm_share,
            time_quota=config.time_quota,
            memory_bytes=spec.memory_mb * MB,
            sm_offset=rect.x / packing.UNITS,
            version=version,
            spec=spec,
            model=spec.model or "",
            weight_bytes=self._weights(spec),
            code=spec.code,
            gated=wants_instances(spec),
        )
        info = InstanceInfo(
            instance_id=name,
            function=spec.name,
            sm_share=config.sm_share,
            time_quota=config.time_quota,
            memory_bytes=command.memory_bytes,
            state=InstanceState.STARTING,
            version=version,
            model=command.model,
            weight_bytes=command.weight_bytes,
            gated=command.gated,
        )
        # In the books before the command goes: a round that runs meanwhile (a tick,
        # another request from zero) counts it, and does not start another.
        self.commanded[name] = Commanded(info, agent_id, self.clock())
        try:
            error = await self._ask(agent_id, "start", encode(command))
        except TimeoutError as exc:
            # Unanswered in time (the agent busy, the reply lost): it may have started
            # it. It stays in the books as commanded until its agent's beat lists it,
            # or START_LOST_S passes, or its agent goes; forgotten now, the next round
            # would start another instance beside it for the same plan entry.
            log.warning("instance.start_unanswered", instance=name, error=repr(exc))
            return None
        if error is not None:
            self.refused += 1
            self.commanded.pop(name, None)
            self._forget(name)
            log.warning("instance.start_refused", instance=name, reason=error.reason)
            return error
        self.started += 1
        log.info("instance.started", instance=name, function=spec.name, agent=agent_id)
        return None

    async def stop(self, name: str) -> None:
        agent_id = next(
            (
                a
                for a, book in self.agents.items()
                for i in book.beat.instances
                if i.instance_id == name
            ),
            None,
        )
        if agent_id is None:
            return
        error = await self._command(agent_id, "stop", encode(StopInstance(instance_id=name)))
        if error is None:
            self.stopped += 1
            log.info("instance.stop", instance=name)

    async def _command(self, agent_id: str, op: str, body: bytes) -> ErrorInfo | None:
        try:
            return await self._ask(agent_id, op, body)
        except TimeoutError as exc:  # the agent is gone or slow: the next tick tries again
            return ErrorInfo(
                code=ErrorCode.UNAVAILABLE, reason=f"agent {agent_id}: {described(exc)}"
            )

    async def _ask(self, agent_id: str, op: str, body: bytes) -> ErrorInfo | None:
        """The agent's answer to a command; TimeoutError when none came in time (done
        or not, unknown)."""
        try:
            answer = await self.bus.request(
                subjects.agent(agent_id, op), body, timeout=COMMAND_TIMEOUT_S
            )
            reply = decode(answer, AgentReply)
        except TimeoutError:
            raise
        except Exception as exc:  # no agent there (or a garbled answer): not done
            return ErrorInfo(
                code=ErrorCode.UNAVAILABLE, reason=f"agent {agent_id}: {described(exc)}"
            )
        return reply.error

    def live(self, inflight: Callable[[str], int]) -> dict[str, list[dict[str, object]]]:
        """Every function's instances: where, with what share, doing how much."""
        out: dict[str, list[dict[str, object]]] = {}
        for agent_id, book in self.agents.items():
            for info in book.beat.instances:
                out.setdefault(info.function, []).append(
                    {
                        "instance": info.instance_id,
                        "agent": agent_id,
                        "device": book.beat.device,
                        "state": str(info.state),
                        "memory_mb": info.memory_bytes // MB,
                        "sm_share": info.sm_share,
                        "time_quota": info.time_quota,
                        "cores": info.cores,
                        "inflight": inflight(info.instance_id),
                        "ready_s": info.ready_s,
                        "version": info.version,
                    }
                )
        return out

    def details(self) -> dict[str, object]:
        return {
            "agents": {
                a: {
                    "device": b.beat.device,
                    "spatial": b.beat.spatial,
                    "memory_total": b.beat.memory_total,
                    "instances": len(b.beat.instances),
                    "shares_weights": b.beat.shares_weights,
                }
                for a, b in self.agents.items()
            },
            # Why the last round could not place an instance of each function.
            "unplaced": dict(self.unplaced),
            "profiled": sorted(self.profiles),
            "started": self.started,
            "stopped": self.stopped,
            "refused": self.refused,
            "plans": {
                f: {
                    "instances": d.instances,
                    "config": [d.plan.config.sm_share, d.plan.config.time_quota],
                    "capacity": round(d.capacity, 3),
                    "share": round(d.share, 3),
                    "slo_unmeetable": d.slo_unmeetable,
                    "clusters": self._clusters(f),
                }
                for f, d in self.last.items()
            },
            "surplus_idle_s": self.surplus_idle_s,
        }

    def _clusters(self, function: str) -> dict[str, float] | None:
        """The function's clusters as planned with (None: too few arrivals yet)."""
        estimator = self.clusters.get(function)
        shape = estimator.held() if estimator is not None else None
        if shape is None:
            return None
        planned = self.settings_for(function)
        return {
            "mean": round(shape.mean, 3),
            "gap_ms": round(shape.gap_s * 1000.0, 3),
            "arrivals": shape.arrivals,
            "burst_mean": planned.burst_mean,
            "burst_gap_ms": planned.burst_gap_ms,
            "burstiness": planned.burstiness,
        }


def fixed_config(spec: FunctionSpec) -> Config | None:
    """The spec's own shares, when it gives any (the other one is then a whole)."""
    if not (spec.sm_share or spec.time_quota):
        return None
    return Config(spec.sm_share or 1.0, spec.time_quota or 1.0)


# The time quotas an unprofiled function that never asked for instances is planned
# at (an isolated node runs every function as instances), besides the whole device.
SHARED_QUOTAS = (0.5, 0.25)


def profile_for(
    spec: FunctionSpec, measured: Sequence[ProfilePoint], exec_ms: float, *, shared: bool = False
) -> tuple[ProfilePoint, ...]:
    """The profile the autoscaler plans with: the measured one, else one row for a
    whole device from the function's observed execution time (or a quarter of its
    SLO before any run); a fixed configuration the profile lacks is scaled from its
    nearest full-device row (time in proportion to the share). `shared`: the spec
    asked for no instances (it runs as instances only because a node isolates handler
    code): unprofiled, it is also planned at parts of the device's time, scaled so,
    and the autoscaler gives it the least that meets its SLO, as functions shared
    one worker's device on other nodes, rather than a whole device each."""
    rows = list(measured)
    if not rows:
        ms = exec_ms if exec_ms > 0.0 else spec.slo_ms / 4.0
        rows = [ProfilePoint(Config(1.0, 1.0), p99_ms=ms, throughput=1000.0 / ms)]
        if shared:
            rows += [
                ProfilePoint(Config(1.0, q), p99_ms=ms / q, throughput=1000.0 * q / ms)
                for q in SHARED_QUOTAS
            ]
    fixed = fixed_config(spec)
    if fixed is not None and all(p.config != fixed for p in rows):
        full = max(rows, key=lambda p: p.config.share)
        stretch = full.config.share / fixed.share
        rows.append(
            ProfilePoint(fixed, p99_ms=full.p99_ms * stretch, throughput=full.throughput / stretch)
        )
    return tuple(rows)


def _demand(info: InstanceInfo) -> packing.Demand:
    return packing.Demand(
        instance_id=info.instance_id,
        function=info.function,
        model=info.model or info.function,
        config=Config(info.sm_share, info.time_quota),
        memory=info.memory_bytes,
        weights=info.weight_bytes,
    )


def _without_adds(decision: ScaleDecision) -> ScaleDecision:
    return dataclasses.replace(decision, add=())
