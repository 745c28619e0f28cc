"""The scheduler: assigns validated invocations to workers.

It reads only headers (the body is forwarded untouched), asks the configured pure
policy for a worker, and forwards the message with the caller's reply subject so
the worker answers the caller directly. It queues work when every worker is full,
places again what a full worker hands back, and answers for invocations whose
worker died.

This module is the wiring: connection, leadership, subscriptions (decoding each
message once) and the periodic chores. The handlers are in handlers.py, the books
in state.py, the leadership lease in leader.py.
"""

from __future__ import annotations

import secrets

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from services.scheduler.handlers import Scheduler
from services.scheduler.leader import Leadership
from shared import jetstream, metrics, subjects
from shared.bus import (
    NatsBus,
    connected,
    decode_event,
    on_event,
    reply_of,
    routed,
    serve_status,
    watch_bus,
)
from shared.config import Settings
from shared.logs import get_logger
from shared.modelstore import ModelStore
from shared.registry import Registry
from shared.scheduling import make_policy
from shared.schema import (
    AgentBeat,
    Done,
    Grant,
    InstanceState,
    Profile,
    ProfileRequest,
    Refused,
    RefusedReply,
    SchedulerBeat,
    WorkerHeartbeat,
    decode,
    encode,
)
from shared.service import every, instance_name

log = get_logger("scheduler")

TICK_S = 0.1
# How long a background profile after a deploy may take.
PROFILE_TIMEOUT_S = 120.0


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    instance = instance_name()
    scheduler_id = f"{instance}-{secrets.token_hex(3)}"
    async with connected(settings.nats_url, "gfaas-scheduler", settings=settings) as nc:
        js = nc.jetstream()
        registry = await Registry.open(js, replicas=settings.js_replicas)
        models = await ModelStore.open(js, replicas=settings.js_replicas)
        leadership = Leadership(
            await jetstream.leader_kv(
                js, ttl_s=settings.scheduler_timeout_s, replicas=settings.js_replicas
            ),
            scheduler_id,
            settings.scheduler_timeout_s,
        )
        scheduler = Scheduler(NatsBus(nc), registry, make_policy(settings.policy), settings, models)
        scheduler.leadership = leadership

        async def on_done(msg: Msg) -> None:
            done = decode_event(msg, Done)
            if done is not None:
                await scheduler.done(done, scheduled=subjects.is_scheduled_done(msg.subject))

        async def on_alive(msg: Msg) -> None:
            scheduler.alive(subjects.last_token(msg.subject))

        async with anyio.create_task_group() as tg:
            await tg.start(registry.watch)
            # Metrics: the Prometheus endpoint (its port in our status), closed with tg.
            telemetry = await tg.start(
                metrics.serve, settings, "scheduler", scheduler_id, lambda: nc.is_connected
            )
            scheduler.metrics = metrics.SchedulerMetrics(
                telemetry.meter,
                lambda: len(scheduler.state.pending),
                # gfaas_instances{function,state}: the instances the agents last reported.
                lambda: [
                    (i.function, str(i.state))
                    for book in list(scheduler.instances.agents.values())
                    for i in book.beat.instances
                ],
                # gfaas_instances_share / _memory: what they hold, per function and device.
                lambda: [
                    metrics.InstanceShare(
                        i.function, agent, i.sm_share, i.time_quota, i.memory_bytes
                    )
                    for agent, book in list(scheduler.instances.agents.items())
                    for i in book.beat.instances
                    if i.state is not InstanceState.FAILED
                ],
            )
            # Heartbeats first, so a restarted scheduler learns the workers before
            # it is asked to place anything.
            await nc.subscribe(
                subjects.HEARTBEAT_ALL, cb=on_event(WorkerHeartbeat, scheduler.heartbeat)
            )
            await nc.subscribe(subjects.DONE_ALL, cb=on_done)
            await nc.subscribe(
                subjects.AGENT_BEAT_ALL, cb=on_event(AgentBeat, scheduler.agent_beat)
            )
            # Profiles: those measured before this scheduler started, and each new one.
            profiles = await jetstream.profiles_kv(js, replicas=settings.js_replicas)
            for profile in await stored_profiles(profiles):
                scheduler.instances.learn(profile)

            async def on_profiled(profile: Profile) -> None:
                scheduler.instances.learn(profile)

            await nc.subscribe(subjects.PROFILED_ALL, cb=on_event(Profile, on_profiled))
            await nc.subscribe(subjects.GRANT_RETURN, cb=on_event(Grant, scheduler.grant_returned))
            await nc.subscribe(subjects.ALIVE_ALL, cb=on_alive)
            # Who leads: what this one holds when it steps down goes to the next.
            await nc.subscribe(
                subjects.SCHEDULER_ALIVE, cb=on_event(SchedulerBeat, scheduler.scheduler_beat)
            )
            await anyio.sleep(min(settings.heartbeat_s * 1.5, 1.0))
            await serve_status(nc, "scheduler", scheduler_id, scheduler.details)
            active = Active(nc, scheduler, settings.scheduler_timeout_s)
            await active.follow(await leadership.keep())
            task_status.started()
            # Held for each round of the lease: stopping waits out the one under way,
            # then no more are taken (a stopping scheduler must not retake the lease).
            leading = anyio.Lock()
            stopping = False

            async def lead() -> None:
                # Renew (or try to take) the lease and say where we stand, often
                # enough that ingress and the standbys notice a death within the timeout.
                period = min(settings.heartbeat_s, settings.scheduler_timeout_s / 3.0)
                while True:
                    async with leading:
                        if stopping:
                            return
                        try:
                            await active.follow(await leadership.keep())
                            beat = SchedulerBeat(
                                scheduler_id=scheduler_id, active=leadership.active
                            )
                            await nc.publish(subjects.SCHEDULER_ALIVE, encode(beat))
                        except Exception as exc:  # the bus is flaky: the next may not be
                            log.warning("scheduler.lead_failed", error=repr(exc))
                    await anyio.sleep(period)

            async def tick() -> None:
                if leadership.active:
                    await scheduler.tick()

            async def ask_profile(function: str) -> None:
                # After a deploy, in the background: an agent measures it on its device.
                try:
                    await nc.request(
                        subjects.PROFILE,
                        encode(ProfileRequest(function=function)),
                        timeout=PROFILE_TIMEOUT_S,
                    )
                except Exception as exc:  # no agent, or slow: planned without one
                    log.warning("profile.not_measured", function=function, error=repr(exc))

            async def profile_new() -> None:
                if leadership.active and scheduler.instances.any_agent():
                    for function in scheduler.instances.unprofiled():
                        tg.start_soon(ask_profile, function)

            tg.start_soon(watch_bus, nc, scheduler.health, scheduler_id)
            tg.start_soon(lead)
            tg.start_soon(every, TICK_S, tick)
            tg.start_soon(every, 1.0, profile_new)
            await stop.wait()
            async with leading:
                stopping = True
            # The lease first, so that a standby takes over now; then what waits here
            # goes to it once it says it leads.
            await leadership.resign()
            beat = SchedulerBeat(scheduler_id=scheduler_id, active=False, stopping=True)
            await nc.publish(subjects.SCHEDULER_ALIVE, encode(beat))
            await active.follow(False)
            tg.cancel_scope.cancel()


async def stored_profiles(kv: KeyValue) -> list[Profile]:
    out = []
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    for key in keys:
        try:
            entry = await kv.get(key)
            if entry.value:
                out.append(decode(entry.value, Profile))
        except Exception as exc:  # one bad entry must not cost the others
            log.warning("profile.unreadable", key=key, error=repr(exc))
    return out


class Active:
    """What only the active scheduler (the lease holder) listens to: new invocations,
    and the ones full workers hand back."""

    def __init__(self, nc: NATS, scheduler: Scheduler, handover_s: float) -> None:
        self.nc = nc
        self.scheduler = scheduler
        # How long what waits here waits for a successor when this one steps down
        # (the lease's TTL: a standby that has not taken it by then is not about to).
        self.handover_s = handover_s
        self.subs: list[Subscription] = []

    async def on_schedule(self, msg: Msg) -> None:
        meta = await routed(self.nc, msg)
        if meta is not None:
            await self.scheduler.schedule(meta, msg.headers or {}, msg.data, reply_of(msg))

    async def on_refused(self, msg: Msg) -> None:
        refused = decode_event(msg, Refused)
        answer = RefusedReply(taken=False)
        if refused is not None:
            answer = await self.scheduler.refused(refused)
        await msg.respond(encode(answer))

    async def follow(self, active: bool) -> None:
        if active and not self.subs:
            for subject, cb in (
                (subjects.SCHEDULE, self.on_schedule),
                (subjects.REFUSED, self.on_refused),
            ):
                self.subs.append(
                    await self.nc.subscribe(subject, queue=subjects.Q_SCHEDULER, cb=cb)
                )
            log.info("scheduler.active")
        elif not active and self.subs:
            subs, self.subs = self.subs, []
            for sub in subs:
                await sub.drain()
            await self.scheduler.hand_over(self.handover_s)
            log.info("scheduler.standby")
