"""The host-tier prefetch policy (pure): which deployed models a node keeps."""

from __future__ import annotations

import pytest

from shared.scheduling.prefetch import Stored, plan

pytestmark = pytest.mark.unit

MB = 1024 * 1024


def test_smallest_first_within_the_budget_and_a_large_one_does_not_block_smaller_ones() -> None:
    wanted = [Stored("big", "b1", 700 * MB), Stored("mid", "m1", 300 * MB), Stored("s", "s1", MB)]
    p = plan(wanted, {}, budget=400 * MB)
    assert [w.model for w in p.fetch] == ["s", "mid"]
    assert p.skipped == ("big",)
    assert p.drop == ()


def test_what_is_held_counts_against_the_budget_and_is_not_fetched_again() -> None:
    wanted = [Stored("a", "a1", 200 * MB), Stored("b", "b1", 300 * MB)]
    p = plan(wanted, {("a", "a1"): 200 * MB}, budget=400 * MB)
    assert p.fetch == ()
    assert p.skipped == ("b",)


def test_models_no_function_uses_and_replaced_copies_are_dropped_unless_served_here() -> None:
    wanted = [Stored("a", "a2", 10 * MB)]  # pushed again: a new key
    held = {("a", "a1"): 10 * MB, ("gone", "g1"): 10 * MB, ("served", "v1"): 10 * MB}
    p = plan(wanted, held, budget=100 * MB, in_use={"served"})
    assert p.drop == (("a", "a1"), ("gone", "g1"))
    assert [w.key for w in p.fetch] == ["a2"]
    # While a process here still serves from the old copy, it stays (and counts).
    p = plan(wanted, {("a", "a1"): 10 * MB}, budget=15 * MB, in_use={"a"})
    assert p.drop == ()
    assert p.skipped == ("a",)


def test_no_budget_fetches_nothing() -> None:
    p = plan([Stored("a", "a1", 1)], {}, budget=0)
    assert p.fetch == ()
    assert p.skipped == ("a",)
