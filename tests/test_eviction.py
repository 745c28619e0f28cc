"""The device cache model and the cost-aware eviction policy."""

from __future__ import annotations

import pytest

from shared.scheduling.cache import DeviceCache
from shared.scheduling.eviction import CannotFit, Victims, choose_victims, eviction_cost

MB = 1_000_000
pytestmark = pytest.mark.unit


def used(cache: DeviceCache, key: str, times: int, now: float = 0.0) -> DeviceCache:
    for _ in range(times):
        cache = cache.use(key, now).release(key)
    return cache


def test_a_model_that_fits_in_free_memory_evicts_nothing() -> None:
    cache = DeviceCache(capacity=1000 * MB).insert("a", 400 * MB, 0.03, 0.0)
    assert choose_victims(cache, "b", 600 * MB, 1.0) == Victims((), 0.0)


def test_eviction_never_drops_a_model_in_use() -> None:
    cache = DeviceCache(capacity=1000 * MB)
    cache = cache.insert("busy", 500 * MB, 0.04, 0.0).use("busy", 0.0)
    cache = cache.insert("idle", 500 * MB, 0.04, 0.0)
    cache = used(cache, "idle", 50)  # far more popular, yet the only choice
    result = choose_victims(cache, "new", 500 * MB, 1.0)
    assert isinstance(result, Victims)
    assert result.keys == ("idle",)


def test_when_models_in_use_pin_the_memory_it_cannot_fit_for_now() -> None:
    cache = DeviceCache(capacity=1000 * MB).insert("busy", 800 * MB, 0.07, 0.0).use("busy", 0.0)
    result = choose_victims(cache, "new", 500 * MB, 1.0)
    assert isinstance(result, CannotFit)
    assert not result.permanent


def test_a_model_bigger_than_the_device_is_an_explicit_permanent_error() -> None:
    result = choose_victims(DeviceCache(capacity=1000 * MB), "huge", 2000 * MB, 0.0)
    assert isinstance(result, CannotFit)
    assert result.permanent
    assert "huge" in result.reason
    assert eviction_cost(DeviceCache(capacity=1000 * MB), "huge", 2000 * MB, 0.0) == float("inf")


def test_the_least_popular_model_per_byte_goes_first() -> None:
    cache = DeviceCache(capacity=1000 * MB)
    cache = cache.insert("popular", 500 * MB, 0.04, 0.0)
    cache = cache.insert("rare", 500 * MB, 0.04, 0.0)
    cache = used(cache, "popular", 10)
    cache = used(cache, "rare", 1)
    result = choose_victims(cache, "new", 300 * MB, 1.0)
    assert isinstance(result, Victims)
    assert result.keys == ("rare",)


def test_victims_made_unnecessary_by_a_later_one_are_given_back() -> None:
    cache = DeviceCache(capacity=1000 * MB)
    cache = cache.insert("small", 100 * MB, 0.01, 0.0)
    cache = cache.insert("big", 900 * MB, 0.08, 0.0)
    cache = used(cache, "small", 1)
    cache = used(cache, "big", 2)
    # "small" is cheaper per byte, but "big" alone frees enough.
    result = choose_victims(cache, "new", 800 * MB, 1.0)
    assert isinstance(result, Victims)
    assert result.keys == ("big",)


def test_popularity_halves_every_half_life() -> None:
    cache = used(DeviceCache(capacity=100, half_life_s=10.0).insert("a", 10, 0.0, 0.0), "a", 4)
    assert cache.popularity("a", 10.0) == pytest.approx(2.0)
    assert cache.popularity("absent", 10.0) == 0.0


def test_cache_transitions_return_new_values_and_leave_the_old_alone() -> None:
    empty = DeviceCache(capacity=100)
    one = empty.insert("a", 60, 0.01, 0.0)
    pinned = one.use("a", 1.0)
    assert not empty.entries
    assert empty.free == 100
    assert one.entries["a"].pins == 0
    assert one.free == 40
    assert pinned.entries["a"].pins == 1
    assert pinned.free == 40
    assert pinned.release("a").evict(["a"]).free == 100


def test_cache_refuses_misuse_loudly() -> None:
    cache = DeviceCache(capacity=100).insert("a", 60, 0.01, 0.0)
    with pytest.raises(ValueError, match="does not fit"):
        cache.insert("b", 50, 0.01, 0.0)
    with pytest.raises(ValueError, match="not in use"):
        cache.release("a")
    with pytest.raises(ValueError, match="in use"):
        cache.use("a", 0.0).evict(["a"])


def test_a_model_still_swapping_in_is_resident_but_not_ready() -> None:
    cache = DeviceCache(capacity=100).insert("a", 60, 0.05, 1.0, ready_at=1.05)
    assert "a" in cache
    assert not cache.ready("a", 1.0)
    assert cache.wait_s("a", 1.0) == pytest.approx(0.05)
    assert cache.ready("a", 1.05)
