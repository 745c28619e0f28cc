"""The lease board: consumers verify handles without a round trip, never wrongly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import msgspec
import pytest

from shared.dataplane.board import BoardReader, LeaseBoard
from shared.dataplane.leases import Fault, LeaseError, LeaseTable
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
