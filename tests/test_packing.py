"""2-D packing of shared-GPU instances: space x time, plus memory, never overcommitted."""

from __future__ import annotations

import random

import pytest

from shared.scheduling.autoscale import Config
from shared.scheduling.packing import (
    Demand,
    Device,
    Placement,
    Rect,
    Refused,
    Slot,
    add,
    place,
    place_all,
    remove,
    scale_in_order,
    units,
    why_not,
)

pytestmark = pytest.mark.unit

GB = 1_000_000_000


def demand(n: int, sm: float, quota: float, memory: int = GB, model: str = "m") -> Demand:
    return Demand(f"i{n}", f"fn-{model}", model, Config(sm, quota), memory)


def device(name: str = "g0", memory: int = 32 * GB, **kw: object) -> Device:
    return Device(name, memory, **kw)  # type: ignore[arg-type]


def fill(d: Device, *demands: Demand) -> Device:
    for x in demands:
        result = add(d, x)
        assert isinstance(result, Device), result
        d = result
    return d


def test_an_instance_fits_on_an_empty_device() -> None:
    d = fill(device(), demand(1, 0.24, 0.6))
    assert d.share_used == pytest.approx(0.24 * 0.6)
    assert d.memory_used == GB


def test_instances_that_tile_the_device_all_fit() -> None:
    d = fill(device(), *(demand(n, 0.5, 0.5) for n in range(4)))
    assert d.share_used == pytest.approx(1.0)
    assert d.free == ()


def test_spatial_overcommit_is_refused_with_the_reason() -> None:
    d = fill(device(), demand(1, 0.6, 1.0))
    refused = add(d, demand(2, 0.5, 0.2))
    assert isinstance(refused, Refused)
    assert "sm_share" in refused.reason
    assert "40%" in refused.reason


def test_temporal_overcommit_is_refused_with_the_reason() -> None:
    d = fill(device(), demand(1, 1.0, 0.7))
    refused = add(d, demand(2, 0.06, 0.4))
    assert isinstance(refused, Refused)
    assert "time_quota" in refused.reason


def test_memory_overcommit_is_refused_with_the_reason() -> None:
    d = fill(device(memory=4 * GB), demand(1, 0.12, 1.0, memory=3 * GB))
    refused = add(d, demand(2, 0.12, 1.0, memory=2 * GB))
    assert isinstance(refused, Refused)
    assert "memory" in refused.reason


def test_a_fragmented_device_says_so() -> None:
    # One quarter held in the corner: three quarters free, but no 60% x 60% rectangle.
    d = device(slots=(Slot(demand(1, 0.5, 0.5), Rect(0, 50, 50, 50)),))
    assert d.share_used == pytest.approx(0.25)
    reason = why_not(d, demand(2, 0.6, 0.6))
    assert reason is not None
    assert reason.startswith("fragmented")


def test_placed_rectangles_never_overlap_nor_leave_the_device() -> None:
    rng = random.Random(8)
    shares = (0.06, 0.12, 0.24, 0.5, 0.6, 0.8, 1.0)
    quotas = (0.2, 0.4, 0.6, 0.8, 1.0)
    d = device()
    for n in range(200):
        result = add(d, demand(n, rng.choice(shares), rng.choice(quotas), memory=0))
        if isinstance(result, Device):
            d = result
    rects = [s.rect for s in d.slots]
    assert len(rects) > 3
    for i, a in enumerate(rects):
        assert min(a.x, a.y) >= 0
        assert max(a.x + a.w, a.y + a.h) <= 100
        assert not any(a.overlaps(b) for b in rects[i + 1 :])
    assert sum(r.area for r in rects) <= 100 * 100


def test_a_device_that_holds_the_model_is_preferred() -> None:
    fuller = fill(device("g0"), demand(1, 0.5, 1.0, model="other"))
    holder = fill(device("g1"), demand(2, 0.12, 1.0, model="m"))
    placed = place([fuller, holder], demand(3, 0.12, 1.0, model="m"))
    assert isinstance(placed, Placement)
    assert placed.device_id == "g1"
    assert placed.tier == 0


def test_a_node_with_the_model_in_its_host_tier_beats_best_fit() -> None:
    fuller = fill(device("g0"), demand(1, 0.5, 1.0, model="other"))
    warm_host = device("g1", host_models=frozenset({"m"}))
    placed = place([fuller, warm_host], demand(2, 0.12, 1.0, model="m"))
    assert isinstance(placed, Placement)
    assert (placed.device_id, placed.tier) == ("g1", 1)


def test_without_residency_the_fullest_device_that_fits_wins() -> None:
    empty = device("g0")
    fuller = fill(device("g1"), demand(1, 0.5, 1.0, model="other"))
    full = fill(device("g2"), demand(2, 1.0, 1.0, model="other"))
    placed = place([empty, fuller, full], demand(3, 0.24, 1.0))
    assert isinstance(placed, Placement)
    assert placed.device_id == "g1"
    assert placed.tier == 2


def test_no_device_with_room_refuses_the_placement_with_the_reasons() -> None:
    full = fill(device("g0"), demand(1, 1.0, 1.0))
    small = device("g1", memory=GB // 2)
    refused = place([full, small], demand(2, 0.12, 1.0))
    assert isinstance(refused, Refused)
    assert "memory" in refused.reason
    assert "sm_share" in refused.reason


def test_a_device_whose_agent_refused_the_start_is_passed_over_with_its_reason() -> None:
    # g0 is the better fit (fuller), but its agent refused a start there just now.
    fuller = fill(device("g0"), demand(1, 0.5, 1.0))
    empty = device("g1")
    placed = place([fuller, empty], demand(2, 0.5, 1.0), refusing={"g0": "no room here"})
    assert isinstance(placed, Placement)
    assert placed.device_id == "g1"
    # Every device refused: the placement is refused with what each agent said.
    refused = place([fuller, empty], demand(2, 0.5, 1.0), refusing={"g0": "x", "g1": "y"})
    assert isinstance(refused, Refused)
    assert "g0 refused the start: x" in refused.reason
    assert "g1 refused the start: y" in refused.reason
    # A refusal on a device that is gone says nothing.
    assert isinstance(place([empty], demand(2, 0.5, 1.0), refusing={"g9": "z"}), Placement)


def test_removing_an_instance_frees_its_rectangle() -> None:
    d = fill(device(), demand(1, 1.0, 0.5), demand(2, 1.0, 0.5))
    assert isinstance(add(d, demand(3, 0.5, 0.5)), Refused)
    d = remove(d, "i1")
    assert isinstance(add(d, demand(3, 0.5, 0.5)), Device)


def test_the_model_leaves_the_device_tier_with_its_last_instance() -> None:
    d = fill(device(), demand(1, 0.12, 1.0), demand(2, 0.12, 1.0))
    assert d.tier("m") == 0
    d = remove(d, "i1")
    assert d.tier("m") == 0
    d = remove(d, "i2")
    assert d.tier("m") == 2


def test_removing_an_instance_that_is_not_there_is_an_error() -> None:
    with pytest.raises(ValueError, match="not on"):
        remove(device(), "ghost")


def test_scale_in_takes_from_the_emptiest_device_first() -> None:
    busy = fill(device("g0"), demand(1, 0.12, 1.0), demand(2, 0.8, 1.0, model="x"))
    quiet = fill(device("g1"), demand(3, 0.12, 1.0))
    order = scale_in_order([busy, quiet], ["i1", "i3", "ghost"])
    assert order == ("i3", "i1", "ghost")


def test_place_all_fits_more_by_placing_the_largest_first() -> None:
    demands = [demand(1, 0.4, 1.0), demand(2, 0.4, 1.0), demand(3, 0.6, 1.0), demand(4, 0.6, 1.0)]
    devices = [device("g0"), device("g1")]
    # In the given order both 40% go on one device and the second 60% finds no room...
    refused = 0
    for d in demands:
        result = place(devices, d)
        if isinstance(result, Refused):
            refused += 1
        else:
            devices = [result.device if x.device_id == result.device_id else x for x in devices]
    assert refused == 1
    # ...largest first, each device takes a 60% and a 40%.
    plan = place_all([device("g0"), device("g1")], demands)
    assert plan.refused == ()
    assert len(plan.placed) == 4


def test_shares_finer_than_a_percent_cannot_be_enforced() -> None:
    assert units(0.24) == 24
    with pytest.raises(ValueError, match="whole percent"):
        units(0.125)
