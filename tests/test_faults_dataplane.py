"""Data-plane faults a tester found: oversized broker requests, a broker killed with
SIGKILL, a second board slot from `unpark`, and intermediates released under a
stage that still reads them."""

from __future__ import annotations

import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import nats
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from services.memory_broker.pools import NodePools
from shared import subjects
from shared.dataplane.backend import tensor_from_handle
from shared.dataplane.board import BoardReader, LeaseBoard, board_name
from shared.dataplane.client import MAX_HANDLES_PER_REQUEST, MAX_LEASES_PER_REQUEST, BrokerClient
from shared.dataplane.elastic import ElasticConfig
from shared.dataplane.leases import LeaseError
from shared.dataplane.shm import ShmBackend, list_segments, unlink_segment
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.natsd import nats_server as nats_server_at
from shared.schema import (
    CheckRequest,
    DType,
    FunctionSpec,
    Handle,
    HandlesReply,
    LeaseRequest,
    ReleaseRequest,
    RetainRequest,
    StageSpec,
    TensorSpec,
    WorkflowSpec,
    decode,
    encode,
)
from tests import funcs
from tests.platform import Platform, platform_at, spawn_service, subprocess_env

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

MB = 1024 * 1024


async def broker_details(client: Client) -> dict[str, object]:
    return (await client.status("memory-broker")).details


async def ask_broker(nc: NATS, op: str, request: object, node: str = "local") -> HandlesReply:
    """A raw broker request, as any client on the bus could send it."""
    msg = await nc.request(subjects.broker(node, op), encode(request), timeout=5)
    return decode(msg.data, HandlesReply)


async def until_broker(broker: BrokerClient, device: str = "cpu") -> Handle:
    """A 1 KiB lease, once the broker answers (it may still be starting)."""
    with anyio.fail_after(30):
        while True:
            try:
                (h,) = await broker.lease([1024], owner="test", device=device)
                return h
            except GfaasError:
                await anyio.sleep(0.05)


# -- 1. a request whose reply cannot fit one message ---------------------------------------


async def test_a_lease_for_too_many_sizes_is_refused_allocating_nothing(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s", workers=0):
        client = Client(nc)
        await until_broker(BrokerClient(nc, "local"))
        many = LeaseRequest(sizes=[1024] * 10_000, owner="greedy")
        reply = await ask_broker(nc, "lease", many)  # answered, not a timeout
        assert reply.error is not None
        assert reply.error.code == "bad_request"
        assert str(MAX_LEASES_PER_REQUEST) in reply.error.reason
        details = await broker_details(client)
        assert details["leases"] == 1  # until_broker's own
        # Other ops' handle lists are bounded the same way.
        (h,) = await BrokerClient(nc, "local").lease([1024], owner="greedy")
        flooded = [h] * (MAX_HANDLES_PER_REQUEST + 1)
        kinds = {"check": CheckRequest, "retain": RetainRequest, "release": ReleaseRequest}
        for op, kind in kinds.items():
            refused = await ask_broker(nc, op, kind(handles=flooded, holder="greedy"))
            assert refused.error is not None, op
            assert refused.error.code == "bad_request", op
            assert str(MAX_HANDLES_PER_REQUEST) in refused.error.reason
        assert (await broker_details(client))["leases"] == 2
    # The client refuses before sending: no broker runs on this node to refuse it.
    with pytest.raises(GfaasError) as local:
        await BrokerClient(nc, "nowhere").lease([1024] * 10_000, owner="greedy")
    assert local.value.code == "bad_request"
    assert str(MAX_LEASES_PER_REQUEST) in local.value.reason


async def test_a_lease_whose_reply_exceeds_the_max_payload_is_refused_allocating_nothing(
    nc: NATS, tmp_path: Path
) -> None:
    with (
        nats_server_at(tmp_path / "nats64", max_payload=64 * 1024) as small,
        platform_at(small.url, tmp_path / "s", workers=0),
    ):
        conn = await nats.connect(small.url)
        try:
            client = Client(conn)
            broker = BrokerClient(conn, "local")
            await until_broker(broker)
            # Within the count limit, but 500 handles take about 90 KB: over 64 KiB.
            reply = await ask_broker(conn, "lease", LeaseRequest(sizes=[256] * 500, owner="t"))
            assert reply.error is not None
            assert reply.error.code == "bad_request"
            assert "65536" in reply.error.reason
            assert (await broker_details(client))["leases"] == 1
            with pytest.raises(GfaasError) as local:  # the client knows the limit too
                await broker.lease([256] * 500, owner="t")
            assert "65536" in local.value.reason
            # What fits is served.
            assert len(await broker.lease([256] * 50, owner="t")) == 50
        finally:
            await conn.drain()


# -- 2. a broker killed with SIGKILL --------------------------------------------------------


def spawn_broker(url: str, namespace: str, node: str) -> subprocess.Popen[bytes]:
    env = subprocess_env(
        GFAAS_NATS_URL=url,
        GFAAS_SHM_NAMESPACE=namespace,
        GFAAS_NODE=node,
        GFAAS_SLAB_MB="1",
        GFAAS_POOL_DEVICES="emu:0",
    )
    return spawn_service("services.memory_broker", env)


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # a process killed (chaos): in CI, not the quick run
async def test_a_restarted_broker_removes_what_a_killed_one_left_and_nothing_else(
    nats_server: NatsServer, nc: NATS
) -> None:
    namespace = f"gfaas-t{secrets.token_hex(4)}"
    # "n-cpu" starts like node "n"'s cpu slabs ("<ns>-pool-n-cpu-..."): it must keep its.
    node, other = "n", "n-cpu"
    try:
        with processes() as procs:
            procs.append(spawn_broker(nats_server.url, namespace, node))
            procs.append(spawn_broker(nats_server.url, namespace, other))
            mine, theirs = BrokerClient(nc, node), BrokerClient(nc, other)
            for broker in (mine, theirs):
                for device in ("cpu", "emu:0"):
                    await until_broker(broker, device)
            kept = await until_broker(theirs)
            tensor_from_handle(kept, "uint8", [1024]).fill_(7)
            before = set(list_segments(f"{namespace}-"))
            killed = procs[0].pid
            left = {f"{namespace}-pool-{node}-{d}-{killed}-" for d in ("cpu", "emu0")}
            left = {s for s in before if s[: s.rindex("-") + 1] in left}
            assert len(left) == 2, before  # node n's cpu and emu:0 slabs

            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            assert left <= set(list_segments(f"{namespace}-"))  # what SIGKILL leaves

            procs.append(spawn_broker(nats_server.url, namespace, node))
            await until_broker(mine)
            after = set(list_segments(f"{namespace}-"))
            assert not left & after, after
            # The live broker of the other node lost nothing, and still serves its lease.
            assert before - left <= after
            await theirs.check([kept], "default")
            assert set(tensor_from_handle(kept, "uint8", [1024]).numpy().tolist()) == {7}
    finally:
        for name in list_segments(f"{namespace}-"):
            unlink_segment(name)


# -- 4. unpark of a lease that was never parked ---------------------------------------------


class NeverMoves:
    async def move(self, src: Handle, dst: Handle) -> None:
        raise AssertionError("nothing parked, nothing moves")


async def test_unpark_of_an_unparked_lease_takes_no_second_board_slot() -> None:
    namespace = f"gfaas-t{secrets.token_hex(4)}"
    board = LeaseBoard(board_name(namespace, "t"), 16)
    pools = NodePools(node="t", instance="i", default_ttl_s=60.0, links=NeverMoves(), board=board)
    pools.add_device(
        "cpu", ShmBackend(prefix=f"{namespace}-pool-"), ElasticConfig(slab_size=MB, max_bytes=MB)
    )
    reader = BoardReader.open(board.name)
    try:
        (h,) = pools.lease([4096], "cpu", "run", "default", 0.0, now=0.0)
        reader.verify(h, "default")
        (again,) = await pools.unpark([h], "run", "default")
        pools.release([h], "run", "default", now=1.0)
        # Released: no slot may still vouch for it, while its block is leased again.
        (reused,) = pools.lease([4096], "cpu", "run", "default", 0.0, now=2.0)
        assert (reused.segment, reused.offset) == (h.segment, h.offset)
        for stale in (h, again):
            with pytest.raises(LeaseError):
                reader.verify(stale, "default")
        reader.verify(reused, "default")
        assert again == h  # the unpark was a no-op: the current handle, on its one slot
    finally:
        reader.close()
        pools.close()
        board.close()


# -- 5. a workflow stage fails while a sibling still reads the shared intermediate ---------

X = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1])]
FANOUT_FUNCS = [
    FunctionSpec(name="add-one", handler="tests.funcs:add_one", inputs=X, concurrency=4),
    FunctionSpec(name="slow-boom", handler="tests.funcs:slow_boom", inputs=X, concurrency=4),
    FunctionSpec(name="late-reader", handler="tests.funcs:late_reader", inputs=X, concurrency=4),
]
# a's output feeds b (fails after 0.3 s) and c (reads it after 1.5 s).
FANOUT = WorkflowSpec(
    name="fail-fast-fanout",
    inputs=X,
    stages=[
        StageSpec(name="a", function="add-one", inputs={"x": "$in.x"}),
        StageSpec(name="b", function="slow-boom", inputs={"x": "a.y"}),
        StageSpec(name="c", function="late-reader", inputs={"x": "a.y"}),
    ],
    outputs={"b": "b.y", "c": "c.y"},
)


@pytest.mark.slow  # over 5 s on this machine: in CI, not the quick run
async def test_a_failed_stage_does_not_free_what_a_sibling_still_reads(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    specs: list[FunctionSpec | WorkflowSpec] = [*FANOUT_FUNCS, FANOUT]
    for spec in specs:
        await client.deploy(spec)
    names = {s.name for s in specs}
    with anyio.fail_after(10):
        while True:
            details = (await client.status("ingress")).details
            if names <= set(details["functions"]) | set(details["workflows"]):
                break
            await anyio.sleep(0.05)
    funcs.SEEN.clear()
    x = np.arange(16 * 1024, dtype=np.float32)  # a's output: 64 KiB, by handle
    reply = await client.invoke_reply(FANOUT.name, {"x": x})
    assert reply.error is not None, reply
    assert reply.error.code == "handler_error", reply
    # The run released a's output when b failed; c has not read it yet. Whoever
    # leases next gets that block if it was freed, and writes there.
    await anyio.sleep(0.1)
    broker = BrokerClient(nc, "local")
    (other,) = await broker.lease([x.nbytes], owner="test")
    tensor_from_handle(other, "float32", [x.size]).fill_(-7.0)
    with anyio.fail_after(10):
        while not funcs.SEEN:
            await anyio.sleep(0.05)
    np.testing.assert_array_equal(funcs.SEEN[0].numpy(), x + 1)
    # The worker's reference went when c was done: a's output is gone with it.
    with anyio.fail_after(5):
        while (await broker_details(client))["leases"] != 1:
            await anyio.sleep(0.05)
    await broker.release([other], "test", "default")


async def test_a_lease_that_checks_inputs_can_hold_them_all_or_nothing(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s", workers=0, pool_cap_mb=1, slab_mb=1):
        client = Client(nc)
        broker = BrokerClient(nc, "local")
        h = await until_broker(broker)  # owned by "test"
        (out,) = await broker.lease([1024], owner="w", check=[h], retain="w")
        await broker.release([h], "test", "default")  # w's reference keeps it
        await broker.check([h], "default")
        # A lease that cannot be served takes no reference either.
        with pytest.raises(GfaasError) as refused:
            await broker.lease([2 * MB], owner="w2", check=[h], retain="w2")
        assert refused.value.code == "payload_too_large"
        await broker.release([h], "w", "default")  # the last reference: freed
        with pytest.raises(GfaasError) as gone:
            await broker.check([h], "default")
        assert gone.value.code == "not_found"
        await broker.release([out], "w", "default")
        assert (await broker_details(client))["leases"] == 0
