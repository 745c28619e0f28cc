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

from services.scheduler.handlers import Scheduler
from services.scheduler.leader import Leadership
from shared import jetstream, subjects
from shared.bus import NatsBus, connected, decode_event, on_event, routed, serve_status, watch_bus
from shared.config import Settings
from shared.logs import get_logger
from shared.modelstore import ModelStore
from shared.registry import Registry
from shared.scheduling import make_policy
from shared.schema import (
    Done,
    Grant,
    Refused,
    RefusedReply,
    SchedulerBeat,
    WorkerHeartbeat,
    encode,
)
from shared.service import every, instance_name

log = get_logger("scheduler")

TICK_S = 0.1


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    instance = instance_name()
    scheduler_id = f"{instance}-{secrets.token_hex(3)}"
    async with connected(settings.nats_url, "gfaas-scheduler") as nc:
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
            # Heartbeats first, so a restarted scheduler learns the workers before
            # it is asked to place anything.
            await nc.subscribe(
                subjects.HEARTBEAT_ALL, cb=on_event(WorkerHeartbeat, scheduler.heartbeat)
            )
            await nc.subscribe(subjects.DONE_ALL, cb=on_done)
            await nc.subscribe(subjects.GRANT_RETURN, cb=on_event(Grant, scheduler.grant_returned))
            await nc.subscribe(subjects.ALIVE_ALL, cb=on_alive)
            await anyio.sleep(min(settings.heartbeat_s * 1.5, 1.0))
            await serve_status(nc, "scheduler", scheduler_id, scheduler.details)
            active = Active(nc, scheduler)
            await active.follow(await leadership.keep())
            task_status.started()

            async def lead() -> None:
                # Renew (or try to take) the lease and say where we stand, often
                # enough that ingress and the standbys notice a death within the timeout.
                period = min(settings.heartbeat_s, settings.scheduler_timeout_s / 3.0)
                while True:
                    try:
                        await active.follow(await leadership.keep())
                        beat = SchedulerBeat(scheduler_id=scheduler_id, active=leadership.active)
                        await nc.publish(subjects.SCHEDULER_ALIVE, encode(beat))
                    except Exception as exc:  # the bus is flaky: the next round may not be
                        log.warning("scheduler.lead_failed", error=repr(exc))
                    await anyio.sleep(period)

            async def tick() -> None:
                if leadership.active:
                    await scheduler.tick()

            tg.start_soon(watch_bus, nc, scheduler.health, scheduler_id)
            tg.start_soon(lead)
            tg.start_soon(every, TICK_S, tick)
            await stop.wait()
            await active.follow(False)
            await leadership.resign()
            beat = SchedulerBeat(scheduler_id=scheduler_id, active=False)
            await nc.publish(subjects.SCHEDULER_ALIVE, encode(beat))
            tg.cancel_scope.cancel()


class Active:
    """What only the active scheduler (the lease holder) listens to: new invocations,
    and the ones full workers hand back."""

    def __init__(self, nc: NATS, scheduler: Scheduler) -> None:
        self.nc = nc
        self.scheduler = scheduler
        self.subs: list[Subscription] = []

    async def on_schedule(self, msg: Msg) -> None:
        meta = await routed(self.nc, msg)
        if meta is not None:
            await self.scheduler.schedule(meta, msg.headers or {}, msg.data, msg.reply)

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
            await self.scheduler.hand_over()
            log.info("scheduler.standby")
