"""The platform on a three-node NATS cluster: replicated JetStream resources, and
async invocations that survive a node's crash.

The chaos test publishes TOTAL async invocations, SIGKILLs the node that leads the
invocations stream while they run, starts it again a few seconds later, and then
requires every invocation to end with its right result, executed exactly once.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import nats
import nats.errors
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from gfaas.client import Client, outputs_of
from shared import jetstream
from shared.config import nats_servers
from shared.errors import GfaasError
from shared.natsd import NatsCluster
from shared.schema import ErrorCode, FunctionSpec, InvokeReply
from tests import funcs
from tests.helpers import body, deploy_and_wait
from tests.platform import Platform, platform_at
from tests.specs import ECHO

pytestmark = [pytest.mark.nats, pytest.mark.slow, pytest.mark.anyio]

COUNT = FunctionSpec(name="count-run", handler="tests.funcs:count_run")
TOTAL = 1000
# When the node goes, and for how long.
KILL_AFTER = 300
DOWN_S = 3.0
SETTLE_S = 50.0
# Still-open outcomes: what a result lookup says while an invocation is under way.
OPEN = {ErrorCode.PENDING, ErrorCode.NOT_FOUND}


@pytest.fixture
def cluster_platform(nats_cluster: NatsCluster, tmp_path: Path) -> Iterator[Platform]:
    # The scheduler's production timeout: a node's loss must not pass for a worker's.
    with platform_at(
        nats_cluster.url, tmp_path / "state", js_replicas=3, workers=2, worker_timeout_s=2.0
    ) as p:
        yield p


@pytest.fixture
async def cluster_nc(nats_cluster: NatsCluster) -> AsyncIterator[NATS]:
    conn = await nats.connect(
        servers=nats_servers(nats_cluster.url),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
    )
    try:
        yield conn
    finally:
        await conn.close()


async def test_the_platform_runs_on_a_cluster_with_every_resource_replicated(
    cluster_platform: Platform, cluster_nc: NATS
) -> None:
    await deploy_and_wait(cluster_nc, ECHO)
    client = Client(cluster_nc, replicas=3)
    out = await client.invoke("echo", {"x": np.array([1.0, 2.0])})
    assert out["y"].tolist() == [1.0, 2.0]
    invocation_id = await client.invoke_async("echo", {"x": np.array([3.0])})
    reply = await settled(client, invocation_id, timeout=10)
    assert outputs_of(reply)["y"].tolist() == [3.0]
    js = cluster_nc.jetstream()
    streams = [
        jetstream.INVOCATIONS_STREAM,
        f"KV_{jetstream.FUNCTIONS_BUCKET}",
        f"KV_{jetstream.WORKFLOWS_BUCKET}",
        f"KV_{jetstream.RESULTS_BUCKET}",
        f"OBJ_{jetstream.MODELS_BUCKET}",
    ]
    for name in streams:
        info = await js.stream_info(name)
        assert info.config.num_replicas == 3, name
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2, name


async def settled(client: Client, invocation_id: str, *, timeout: float) -> InvokeReply:
    with anyio.fail_after(timeout):
        while True:
            reply = await client.result(invocation_id)
            if reply.error is None or reply.error.code not in OPEN:
                return reply
            await anyio.sleep(0.05)


async def publish_all(js: JetStreamContext, killed: anyio.Event, retries: Counter[str]) -> None:
    """Publish TOTAL invocations, each until JetStream acknowledges it (its id makes a
    retry harmless); `killed` is set once KILL_AFTER are in."""
    sent = 0

    async def one(n: int) -> None:
        nonlocal sent
        while True:
            try:
                await js.publish(
                    "gfaas.v1.invoke_async.count-run",
                    body(n=np.array(n, dtype=np.int64)),
                    headers={"Nats-Msg-Id": f"chaos-{n}"},
                    timeout=2.0,
                )
                break
            except nats.errors.Error as exc:  # no stream leader, reconnecting, timeout
                retries[type(exc).__name__] += 1
                await anyio.sleep(0.1)
        sent += 1
        if sent == KILL_AFTER:
            killed.set()

    # A few publishers at once: a fast producer, as a real client would be.
    numbers = iter(range(TOTAL))

    async def publisher() -> None:
        for n in numbers:
            await one(n)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(publisher)


async def chaos(cluster: NatsCluster, nc: NATS, killed: anyio.Event, log: list[str]) -> None:
    """SIGKILL the invocations stream's leader once KILL_AFTER are published, start it
    again DOWN_S later, and wait until it has caught up."""
    info = await nc.jetstream().stream_info(jetstream.INVOCATIONS_STREAM)
    assert info.cluster is not None
    leader = info.cluster.leader
    node = next(n for n in cluster.nodes if n.name == leader)
    await killed.wait()
    node.kill()
    log.append(f"killed {node.name} (stream leader) at {time.monotonic():.1f}")
    await anyio.sleep(DOWN_S)
    await anyio.to_thread.run_sync(node.start)
    await anyio.to_thread.run_sync(cluster.wait_ready, 30.0)
    log.append(f"{node.name} back and current at {time.monotonic():.1f}")


async def outcomes(client: Client, ids: dict[str, int]) -> dict[int, InvokeReply]:
    """Every invocation's settled reply, polling until SETTLE_S runs out."""
    done: dict[int, InvokeReply] = {}
    limiter = anyio.Semaphore(32)

    async def look(invocation_id: str, n: int) -> None:
        async with limiter:
            try:
                reply = await client.result(invocation_id, timeout=2.0)
            except (nats.errors.Error, GfaasError):
                return  # the bus is busy or reconnecting (or no ingress yet): next round
            if reply.error is None or reply.error.code not in OPEN:
                done[n] = reply

    with anyio.move_on_after(SETTLE_S):
        while len(done) < len(ids):
            async with anyio.create_task_group() as tg:
                for invocation_id, n in ids.items():
                    if n not in done:
                        tg.start_soon(look, invocation_id, n)
            if len(done) < len(ids):
                await anyio.sleep(0.25)
    return done


async def drained(nc: NATS, timeout: float) -> int:
    """Messages left in the work queue after waiting up to `timeout` for none (each is
    removed when acknowledged; what remains may still be redelivered and run)."""
    js = nc.jetstream()
    left = -1
    with anyio.move_on_after(timeout):
        while True:
            try:
                left = (await js.stream_info(jetstream.INVOCATIONS_STREAM)).state.messages
            except nats.errors.Error:
                left = -1
            if left == 0:
                return 0
            await anyio.sleep(0.2)
    return left


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def where(exc: BaseException) -> str:
    """The innermost frame of ours that an exception passed through."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/services/" in f.filename or "/shared/" in f.filename]
    if not frames:
        return ""
    frame = (ours or frames)[-1]
    return f" at {Path(frame.filename).name}:{frame.lineno} {frame.name}"


async def diagnosis(client: Client, platform: Platform) -> str:
    """Services that ended, and what ingress and the async consumer say, for the
    failure message (best effort)."""
    parts = []
    for name, future in platform.futures.items():
        if future.done() and future.exception() is not None:
            crash = ", ".join(f"{e!r}{where(e)}" for e in leaves(future.exception()))
            parts.append(f"{name} ended: {crash}")
    try:
        details = (await client.status("ingress")).details
        parts.append(f"ingress async {details.get('async')}")
    except Exception as exc:
        parts.append(f"ingress status: {exc!r}")
    try:
        info = await client.nc.jetstream().consumer_info(
            jetstream.INVOCATIONS_STREAM, jetstream.ASYNC_CONSUMER
        )
        parts.append(
            f"consumer pending {info.num_pending}, ack pending {info.num_ack_pending}, "
            f"redelivered {info.num_redelivered}, waiting pulls {info.num_waiting}"
        )
    except Exception as exc:
        parts.append(f"consumer info: {exc!r}")
    return "; ".join(parts)


@pytest.mark.timeout(180)
async def test_async_invocations_survive_a_node_killed_and_restarted(
    nats_cluster: NatsCluster, cluster_platform: Platform, cluster_nc: NATS
) -> None:
    funcs.RUNS.clear()
    await deploy_and_wait(cluster_nc, COUNT)
    client = Client(cluster_nc, replicas=3)
    ids = {f"chaos-{n}": n for n in range(TOTAL)}
    killed = anyio.Event()
    retries: Counter[str] = Counter()
    log: list[str] = []
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(chaos, nats_cluster, cluster_nc, killed, log)
        await publish_all(cluster_nc.jetstream(), killed, retries)
        published = time.monotonic() - started
    done = await outcomes(client, ids)
    left = await drained(cluster_nc, 25.0)
    elapsed = time.monotonic() - started

    runs = Counter(funcs.RUNS)
    lost = sorted(set(range(TOTAL)) - set(done))
    errors = Counter(str(r.error.code) for r in done.values() if r.error is not None)
    wrong = sorted(
        n for n, r in done.items() if r.error is None and outputs_of(r)["y"].item() != n + 1
    )
    duplicated = sorted(n for n, count in runs.items() if count > 1)
    ok_not_run = sorted(n for n, r in done.items() if r.error is None and runs[n] == 0)
    summary = (
        f"{TOTAL} published in {published:.1f}s (publish retries {dict(retries)}), "
        f"settled {len(done)} in {elapsed:.1f}s; lost {len(lost)} {lost[:10]}, "
        f"errors {dict(errors)}, wrong {len(wrong)} {wrong[:10]}, "
        f"executions {sum(runs.values())}, duplicated {len(duplicated)} {duplicated[:10]}, "
        f"ok without a run {len(ok_not_run)}, left in the queue {left}; {'; '.join(log)}; "
        f"{await diagnosis(client, cluster_platform)}"
    )
    print(summary)
    assert len(log) == 2, summary  # the node was killed and came back
    found = (len(lost), dict(errors), len(wrong), len(duplicated), len(ok_not_run), left)
    assert found == (0, {}, 0, 0, 0, 0), summary
    assert sum(runs.values()) == TOTAL, summary
