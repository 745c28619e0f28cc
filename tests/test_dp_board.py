"""The lease board: consumers verify handles without a round trip, never wrongly."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import cast

import msgspec
import pytest
from nats.aio.client import Client as NATS

from shared.dataplane.backend import BackendError
from shared.dataplane.board import BoardReader, LeaseBoard
from shared.dataplane.client import BrokerClient
from shared.dataplane.leases import Fault, LeaseError, LeaseTable
from shared.dataplane.shm import SHM_DIR, list_segments, unlink_segment
from shared.schema import Handle

pytestmark = pytest.mark.unit


@pytest.fixture
def board() -> Iterator[LeaseBoard]:
    b = LeaseBoard(f"gfaas-test-board-{uuid.uuid4().hex[:8]}", slots=4)
    yield b
    b.close()


@pytest.fixture
def table() -> LeaseTable:
    t = LeaseTable(id_prefix="b.")
    t.add_device("cpu", 1 << 20)
    t.add_slab("cpu", 1 << 20, "seg-a")
    return t


def lease_handle(table: LeaseTable, board: LeaseBoard, tenant: str = "acme") -> Handle:
    lease = table.lease(4096, "cpu", "w", now=0.0, tenant=tenant)
    handle = table.to_handle(lease, backend="shm", pool="local")
    return msgspec.structs.replace(handle, slot=board.publish(lease))


def fault(reader: BoardReader, handle: Handle, tenant: str = "acme") -> Fault:
    with pytest.raises(LeaseError) as info:
        reader.verify(handle, tenant)
    return info.value.fault


def test_a_live_lease_verifies_and_every_forgery_fails(
    board: LeaseBoard, table: LeaseTable
) -> None:
    reader = BoardReader.open(board.name)
    h = lease_handle(table, board)
    reader.verify(h, "acme")
    reader.verify(msgspec.structs.replace(h, offset=h.offset + 1024, nbytes=1024), "acme")
    assert fault(reader, h, tenant="mallory") is Fault.FOREIGN_TENANT
    assert fault(reader, msgspec.structs.replace(h, tenant="mallory"), "mallory") is (
        Fault.FOREIGN_TENANT
    )
    assert fault(reader, msgspec.structs.replace(h, generation=h.generation + 1)) is Fault.STALE
    assert fault(reader, msgspec.structs.replace(h, lease_id="b.99")) is Fault.STALE
    assert fault(reader, msgspec.structs.replace(h, segment="seg-b")) is Fault.WRONG_PLACE
    assert fault(reader, msgspec.structs.replace(h, nbytes=h.nbytes + 1)) is Fault.OUT_OF_BOUNDS
    assert fault(reader, msgspec.structs.replace(h, slot=-1)) is Fault.UNKNOWN
    assert fault(reader, msgspec.structs.replace(h, slot=4)) is Fault.UNKNOWN


def test_a_released_lease_fails_even_when_its_slot_and_block_are_reused(
    board: LeaseBoard, table: LeaseTable
) -> None:
    reader = BoardReader.open(board.name)
    old = lease_handle(table, board)
    table.release(old.lease_id, "w")
    board.retract(old.lease_id)
    assert fault(reader, old) is Fault.STALE
    new = lease_handle(table, board)
    # Same block and slot, another lease: the old handle still fails, the new one passes.
    assert (new.offset, new.slot) == (old.offset, old.slot)
    assert fault(reader, old) is Fault.STALE
    reader.verify(new, "acme")


def test_a_full_board_hands_out_no_slot(board: LeaseBoard, table: LeaseTable) -> None:
    slots = [lease_handle(table, board).slot for _ in range(5)]
    assert slots[:4] == [0, 1, 2, 3]
    assert slots[4] == -1


def test_a_client_stops_trusting_a_board_a_restarted_broker_replaced(table: LeaseTable) -> None:
    name = f"gfaas-test-board-{uuid.uuid4().hex[:8]}"
    # The client never reaches the bus here: what the board vouches for needs no trip.
    client = BrokerClient(cast(NATS, None), "n", board=name)
    old = LeaseBoard(name, slots=4)
    try:
        gone = lease_handle(table, old)
        assert client.unverified([gone], "acme") == []
        # The broker crashes (its board is never closed) and a new one starts: it
        # unlinks the old board and makes its own. The client still maps the old one,
        # which stays alive while mapped and still shows the dead broker's leases.
        new = LeaseBoard(name, slots=4)
        try:
            assert client.unverified([gone], "acme") == [gone]
            # The new broker's leases are vouched for locally at once.
            live = lease_handle(table, new)
            assert client.unverified([live], "acme") == []
            assert client.unverified([gone], "acme") == [gone]
        finally:
            new.close()
        # A broker that shut down leaves nothing to trust either.
        assert client.unverified([live], "acme") == [live]
    finally:
        if client._board is not None:
            client._board.close()
        unlink_segment(name)
    assert list_segments(name) == []


def test_a_board_replaced_behind_the_brokers_back_is_noticed_at_the_next_recheck(
    table: LeaseTable,
) -> None:
    name = f"gfaas-test-board-{uuid.uuid4().hex[:8]}"
    client = BrokerClient(cast(NATS, None), "n", board=name)
    old = LeaseBoard(name, slots=4)
    try:
        gone = lease_handle(table, old)
        assert client.unverified([gone], "acme") == []
        # Someone removed the board file, then the broker died and a new one started:
        # nobody could mark the old mapping retired, so only its name says it moved.
        os.unlink(SHM_DIR / name)
        new = LeaseBoard(name, slots=4)
        try:
            client._board_recheck_at = 0.0  # as if the recheck interval had passed
            assert client.unverified([gone], "acme") == [gone]
            live = lease_handle(table, new)
            assert client.unverified([live], "acme") == []
        finally:
            new.close()
    finally:
        if client._board is not None:
            client._board.close()
        old._segment.close()
        unlink_segment(name)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user owns")
def test_a_board_another_user_left_under_the_name_is_not_trusted() -> None:
    """A live-looking board a handler (another uid) planted under the board's name,
    its broker's gone: mapped, its invented slots would vouch for handles."""
    name = f"gfaas-test-board-{uuid.uuid4().hex[:8]}"
    real = LeaseBoard(name, slots=4)
    try:
        os.chown(os.path.join(SHM_DIR, name), 65534, 65534)  # as if nobody made it
        with pytest.raises(BackendError, match="belongs to uid 65534"):
            BoardReader.open(name)
    finally:
        real.close()
        unlink_segment(name)
