from __future__ import annotations

import math

import pytest

from shared.dataplane.elastic import (
    DemandEstimator,
    ElasticConfig,
    ElasticPool,
    Intermediate,
    PendingConsumer,
    SlabUse,
    next_uses,
    plan_residency,
    plan_spill,
    with_next_uses,
)

pytestmark = pytest.mark.unit

MiB = 1 << 20
SLAB = 16 * MiB


def pool(min_slabs: int = 0) -> ElasticPool:
    return ElasticPool(
        ElasticConfig(
            slab_size=SLAB, max_bytes=8 * SLAB, cooldown_s=10.0, headroom=1.0, min_slabs=min_slabs
        )
    )


def feed(p: ElasticPool, *, rate: float, size: int, lifetime: float, until: float) -> None:
    t = 0.0
    while t < until:
        p.demand.observe_lease(t, size)
        p.demand.observe_release(size, lifetime)
        t += 1.0 / rate


def test_demand_is_rate_times_size_times_lifetime() -> None:
    d = DemandEstimator(rate_tau_s=5.0, alpha=0.2)
    t = 0.0
    while t < 60.0:
        d.observe_lease(t, 4 * MiB)
        d.observe_release(4 * MiB, 0.5)
        t += 0.1
    assert d.rate(t) == pytest.approx(10.0, rel=0.1)
    assert d.demand_bytes(t) == pytest.approx(10.0 * 4 * MiB * 0.5, rel=0.1)


def test_demand_decays_when_requests_stop() -> None:
    d = DemandEstimator(rate_tau_s=5.0, alpha=0.2)
    for i in range(100):
        d.observe_lease(i * 0.1, MiB)
    assert d.rate(60.0) < d.rate(10.0) / 100


def test_the_pool_grows_by_slabs_towards_demand_up_to_the_cap() -> None:
    p = pool()
    feed(p, rate=20, size=4 * MiB, lifetime=0.5, until=30.0)  # about 40 MiB live
    plan = p.plan(30.0, [SlabUse(1, SLAB, 0)])
    assert plan.add == (SLAB, SLAB)
    feed(p, rate=200, size=4 * MiB, lifetime=1.0, until=30.0)
    plan = p.plan(30.0, [SlabUse(1, SLAB, 0)])
    assert len(plan.add) == 7  # capped at 8 slabs


def test_idle_slabs_are_returned_only_after_the_cooldown() -> None:
    p = pool()
    slabs = [SlabUse(i, SLAB, 0) for i in range(4)]
    assert p.plan(100.0, slabs).remove == ()
    assert p.plan(105.0, slabs).remove == ()
    assert set(p.plan(110.0, slabs).remove) == {0, 1, 2, 3}


def test_a_slab_that_was_used_restarts_its_cooldown() -> None:
    p = pool()
    p.plan(0.0, [SlabUse(1, SLAB, 0)])
    p.plan(5.0, [SlabUse(1, SLAB, MiB)])
    assert p.plan(12.0, [SlabUse(1, SLAB, 0)]).remove == ()
    assert p.plan(22.0, [SlabUse(1, SLAB, 0)]).remove == (1,)


def test_an_idle_pool_gives_back_its_last_slab_after_the_cooldown() -> None:
    p = pool()
    # Large leases held long: E[size x lifetime] is huge, so the decayed rate times it
    # stays above zero bytes for about an hour (until exp underflows).
    t = 0.0
    for _ in range(20):
        p.demand.observe_lease(t, SLAB)
        p.demand.observe_release(SLAB, 300.0)
        t += 1.0
    last = t - 1.0
    slabs = [SlabUse(1, SLAB, 0)]
    p.plan(last, slabs)  # empty from the last release on
    assert p.plan(last + 5.0, slabs).remove == ()  # still cooling down
    plan = p.plan(last + 10.0, slabs)  # a whole cool-down (10 s) without a lease
    assert plan.remove == (1,)
    assert plan.target_bytes == 0


def test_the_pool_never_shrinks_below_live_leases() -> None:
    p = pool()
    slabs = [SlabUse(1, SLAB, SLAB // 2), SlabUse(2, SLAB, MiB), SlabUse(3, SLAB, 0)]
    for t in (0.0, 100.0, 1000.0):
        plan = p.plan(t, slabs)
        assert plan.target_bytes >= SLAB // 2 + MiB
        assert set(plan.remove) <= {3}
    assert p.plan(2000.0, slabs).remove == (3,)


def test_min_slabs_are_kept_even_when_idle() -> None:
    p = pool(min_slabs=2)
    slabs = [SlabUse(i, SLAB, 0) for i in range(3)]
    p.plan(0.0, slabs)
    assert len(p.plan(100.0, slabs).remove) == 1


def test_an_exhausted_lease_gets_one_slab_big_enough_within_the_cap() -> None:
    p = pool()
    assert p.grow_for(MiB, [SlabUse(1, SLAB, SLAB)]).add == (SLAB,)
    assert p.grow_for(40 * MiB + 1, []).add == (40 * MiB + 256,)
    full = [SlabUse(i, SLAB, SLAB) for i in range(8)]
    assert p.grow_for(MiB, full).add == ()


def test_a_lease_larger_than_the_empty_slabs_filling_the_cap_gets_them_given_back() -> None:
    # Blocks never span slabs: eight empty 16 MiB slabs cannot hold 32 MiB, and
    # kept for their cool-down they would fill the cap while nothing is leased.
    p = pool()
    slabs = [SlabUse(i, SLAB, SLAB if i == 0 else 0) for i in range(8)]
    plan = p.grow_for(2 * SLAB, slabs)
    assert plan.add == (2 * SLAB,)
    assert len(plan.remove) == 2
    assert 0 not in plan.remove
    # Nothing is given back when even that would not make room.
    busy = [SlabUse(i, SLAB, SLAB if i < 7 else 0) for i in range(8)]
    refused = p.grow_for(2 * SLAB, busy)
    assert refused.add == ()
    assert refused.remove == ()


def item(key: str, mib: int, on_device: bool, next_use: float = math.inf) -> Intermediate:
    return Intermediate(key, mib * MiB, on_device, next_use)


def test_spill_takes_data_whose_consumer_runs_last_not_the_least_recent() -> None:
    items = [
        item("soon", 4, True, next_use=1.0),
        item("later", 4, True, next_use=5.0),
        item("orphan", 4, True),
        Intermediate("busy", 4 * MiB, True, math.inf, in_use=True),
    ]
    assert plan_spill(items, 6 * MiB) == (("orphan", "later"), 8 * MiB)
    keys, freed = plan_spill(items, 100 * MiB)
    assert "busy" not in keys
    assert freed == 12 * MiB


def test_next_use_comes_from_the_soonest_queued_consumer() -> None:
    queue = [PendingConsumer(3.0, ("a", "b")), PendingConsumer(1.0, ("b",))]
    assert next_uses(queue) == {"a": 3.0, "b": 1.0}
    items = with_next_uses([item("a", 1, True), item("c", 1, True)], next_uses(queue))
    assert [i.next_use for i in items] == [3.0, math.inf]


def test_residency_prefetches_soonest_first_and_spills_furthest_to_make_room() -> None:
    items = [
        item("d-late", 4, True, next_use=50.0),
        item("d-none", 4, True),
        item("h-soon", 4, False, next_use=1.0),
        item("h-next", 4, False, next_use=2.0),
        item("h-beyond", 4, False, next_use=100.0),
    ]
    plan = plan_residency(items, 12 * MiB, now=0.0, horizon_s=10.0)
    assert plan.prefetch == ("h-soon", "h-next")
    assert plan.spill == ("d-none",)
    assert plan.device_bytes == 12 * MiB


def test_residency_leaves_everything_alone_when_it_fits() -> None:
    items = [item("a", 4, True), item("b", 4, False, next_use=1.0)]
    plan = plan_residency(items, 64 * MiB, now=0.0, horizon_s=10.0)
    assert (plan.spill, plan.prefetch) == ((), ("b",))
