"""Temporal sharing: the token arbiter, driven by a simulated clock, and its anyio runner."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import anyio
import pytest

from shared.sharing import ShareError
from shared.sharing.runner import TokenRunner
from shared.sharing.tokens import Grant, Shares, TokenArbiter, WaitUntil, Why

W = 0.1  # the window
BATCH = 0.005  # every simulated batch takes this long on the device


def always(t: float) -> bool:
    return True


def simulate(
    arb: TokenArbiter,
    busy: Mapping[str, Callable[[float], bool]],
    *,
    until: float,
    changes: tuple[float, ...] = (),
    batch_s: Mapping[str, float] | None = None,
) -> dict[str, list[float]]:
    """Each instance runs batches (BATCH long, or its `batch_s`) whenever
    `busy[name](t)` says it has work.

    Returns each one's device time per window (the window a batch ends in). Like the
    runner, every charge wakes everyone waiting; `changes` are when `busy` changes.
    """
    used = {name: [0.0] * math.ceil(until / W) for name in busy}
    length = {name: (batch_s or {}).get(name, BATCH) for name in busy}
    ends: dict[str, float] = {}
    wake = dict.fromkeys(busy, 0.0)
    t = 0.0
    while t < until:
        for name, has_work in busy.items():
            if name not in ends and has_work(t) and wake[name] <= t:
                decision = arb.request(name, t)
                if isinstance(decision, Grant):
                    ends[name] = t + length[name]
                else:
                    assert decision.at > t
                    wake[name] = decision.at
        later = [
            *ends.values(),
            *(w for w in wake.values() if w > t),
            *(c for c in changes if c > t),
        ]
        t = min(later)
        for name, end in list(ends.items()):
            if end <= t + 1e-12:
                del ends[name]
                arb.charge(name, length[name], t)
                window = min(math.floor(t / W + 1e-9), len(used[name]) - 1)
                used[name][window] += length[name]
                wake = dict.fromkeys(busy, t)
    return used


def between(start: float, stop: float) -> Callable[[float], bool]:
    return lambda t: start <= t < stop


@pytest.mark.unit
def test_busy_instances_get_time_in_proportion_to_their_quotas() -> None:
    arb = TokenArbiter(W)
    arb.add("a", 0.25)
    arb.add("b", 0.75)
    # Batches of unequal lengths that do not divide the window.
    lengths = {"a": 0.003, "b": 0.007}
    used = simulate(arb, {"a": always, "b": always}, until=50 * W, batch_s=lengths)
    share = sum(used["a"]) / (sum(used["a"]) + sum(used["b"]))
    assert share == pytest.approx(0.25, abs=0.02)
    # Work-conserving: the device never idled while both had work.
    assert sum(used["a"]) + sum(used["b"]) == pytest.approx(50 * W, abs=0.01)


@pytest.mark.unit
def test_an_idle_instances_time_is_lent_and_returned_when_it_wakes() -> None:
    arb = TokenArbiter(W)
    arb.add("a", 0.25, 0.1)
    arb.add("b", 0.75, 0.1)

    # b works, idles for ten windows, then wakes in the middle of window 20.
    def b_busy(t: float) -> bool:
        return t < 1.0 or t >= 2.05

    used = simulate(arb, {"a": always, "b": b_busy}, until=3.0, changes=(1.0, 2.05))
    a, b = used["a"], used["b"]
    assert all(x == pytest.approx(0.25 * W, abs=BATCH) for x in a[1:10])
    # b's idle time went to a: the whole window, a's maximum.
    assert all(x == pytest.approx(W, abs=BATCH) for x in a[11:20])
    # Awake, b is served at once (a used half of window 20 already, b ranks first)...
    assert b[20] >= 0.05 - 2 * BATCH
    # ...and has its quota back from the next window on.
    assert all(x == pytest.approx(0.75 * W, abs=BATCH) for x in b[21:30])


@pytest.mark.unit
def test_a_maximum_caps_an_instance_even_on_an_idle_device() -> None:
    arb = TokenArbiter(W)
    arb.add("a", 0.25, 0.0, 0.5)
    used = simulate(arb, {"a": always}, until=10 * W)
    assert all(x == pytest.approx(0.5 * W, abs=1e-9) for x in used["a"])
    assert isinstance(arb.request("a", 10 * W), Grant)
    arb.charge("a", 0.05, 10 * W + 0.05)
    assert arb.request("a", 10 * W + 0.06) == WaitUntil(11 * W, Why.CAPPED)


@pytest.mark.unit
def test_minimums_hold_when_the_bases_oversubscribe_the_device() -> None:
    arb = TokenArbiter(W)
    # Bases sum to 2.3: by base alone, a would get 13%. Its minimum is 30%.
    arb.add("a", 0.3, 0.3)
    arb.add("b", 1.0, 0.5)
    arb.add("c", 1.0, 0.0)
    used = simulate(arb, {"a": always, "b": always, "c": always}, until=30 * W)
    for window in range(1, 30):
        assert used["a"][window] >= 0.3 * W - BATCH
        assert used["b"][window] >= 0.5 * W - BATCH
        assert sum(used[n][window] for n in "abc") == pytest.approx(W, abs=1.01 * BATCH)


@pytest.mark.unit
def test_guaranteed_quotas_over_one_window_are_refused_with_a_reason() -> None:
    arb = TokenArbiter(W)
    arb.add("a", 0.6, 0.6)
    with pytest.raises(ShareError, match=r"b: minimum 0.5 .* to 1.10 of the window, over 1"):
        arb.add("b", 0.5, 0.5)
    assert "b" not in arb
    assert arb.guaranteed == pytest.approx(0.6)
    assert arb.refusal("b", Shares(base=0.4, minimum=0.4)) is None
    assert "base > 0" in str(arb.refusal("c", Shares(base=0.0)))
    assert "maximum" in str(arb.refusal("c", Shares(base=0.5, maximum=0.4)))
    assert "already" in str(arb.refusal("a", Shares(base=0.1)))


@pytest.mark.unit
def test_the_quota_follows_bursts_within_its_bounds() -> None:
    arb = TokenArbiter(W)
    arb.add("a", 0.25, 0.0, 0.5)
    assert arb.quota_s("a") == pytest.approx(0.025)
    for i in range(12):
        assert isinstance(arb.request("a", i * W), Grant)
        arb.charge("a", 0.002, i * W)
    # Half the burst, half the past: short batches shrink it toward them.
    assert arb.quota_s("a") == pytest.approx(0.002, abs=1e-5)
    grant = arb.request("a", 20 * W)
    assert isinstance(grant, Grant)
    arb.charge("a", 0.3, 20 * W)  # one long batch: capped at the maximum
    assert arb.quota_s("a") == pytest.approx(0.5 * W)


@pytest.mark.unit
def test_a_batch_past_the_maximum_is_paid_for_in_the_next_windows() -> None:
    arb = TokenArbiter(W)
    arb.add("a", 0.5, 0.0, 0.5)
    assert isinstance(arb.request("a", 0.0), Grant)
    arb.charge("a", 0.12, 0.0)  # 120 ms where 50 ms a window is its limit
    assert arb.used_s("a", 1.5 * W) == pytest.approx(0.07)
    assert isinstance(arb.request("a", 1.5 * W), WaitUntil)
    grant = arb.request("a", 2.5 * W)
    assert isinstance(grant, Grant)
    assert grant.slice_s == pytest.approx(0.05 - 0.02)


@pytest.mark.unit
def test_one_holder_at_a_time_unless_spatial_shares_fit_together() -> None:
    arb = TokenArbiter(W)
    arb.add("a", 0.5)
    arb.add("b", 0.5)
    assert isinstance(arb.request("a", 0.0), Grant)
    assert arb.request("b", 0.0) == WaitUntil(W, Why.HELD)
    with pytest.raises(ShareError, match="already holds"):
        arb.request("a", 0.0)
    arb.charge("a", 0.01, 0.01)
    with pytest.raises(ShareError, match="holds no grant"):
        arb.charge("a", 0.01, 0.01)

    spatial = TokenArbiter(W)
    spatial.add("a", 0.5, sm=0.5)
    spatial.add("b", 0.5, sm=0.5)
    spatial.add("c", 0.5, sm=0.6)
    assert isinstance(spatial.request("a", 0.0), Grant)
    assert isinstance(spatial.request("b", 0.0), Grant)
    assert spatial.request("c", 0.0) == WaitUntil(W, Why.HELD)
    assert spatial.holders() == ["a", "b"]


def _b_waits() -> TokenArbiter:
    """a held the device; b asked while it did and waits; c has not asked yet."""
    arb = TokenArbiter(W)
    for name in "abc":
        arb.add(name, 0.5)
    assert isinstance(arb.request("a", 0.0), Grant)
    assert isinstance(arb.request("b", 0.0), WaitUntil)
    arb.charge("a", 0.01, 0.01)
    return arb


@pytest.mark.unit
def test_a_waiter_that_withdraws_blocks_nobody() -> None:
    arb = _b_waits()
    behind = arb.request("c", 0.02)  # b asked first: it ranks ahead
    assert isinstance(behind, WaitUntil)
    assert behind.why is Why.BEHIND
    arb.withdraw("b")
    assert isinstance(arb.request("c", 0.02), Grant)
    assert arb.waiting(0.02) == []


@pytest.mark.unit
def test_a_waiter_that_stops_asking_blocks_nobody_after_a_window() -> None:
    arb = _b_waits()  # and b never asks again
    assert isinstance(arb.request("c", 0.05), WaitUntil)  # b may still come back
    assert arb.waiting(0.05) == ["b", "c"]
    assert isinstance(arb.request("c", 0.15), Grant)


@pytest.mark.unit
def test_removing_an_instance_frees_its_grant_and_its_guarantee() -> None:
    arb = TokenArbiter(W)
    arb.add("a", 0.8, 0.8)
    assert isinstance(arb.request("a", 0.0), Grant)
    arb.remove("a")
    arb.add("b", 0.9, 0.9)
    assert isinstance(arb.request("b", 0.0), Grant)
    with pytest.raises(ShareError, match="no shares"):
        arb.request("a", 0.0)


# -- the runner ----------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.anyio
async def test_runner_turns_never_overlap_and_every_one_is_served() -> None:
    runner = TokenRunner(TokenArbiter(0.02))
    runner.arbiter.add("a", 0.5)
    runner.arbiter.add("b", 0.5)
    running: list[str] = []
    overlaps = 0
    done: dict[str, int] = {"a": 0, "b": 0}

    async def work(name: str) -> None:
        nonlocal overlaps
        for _ in range(8):
            async with runner.turn(name):
                running.append(name)
                overlaps += len(running) > 1
                await anyio.sleep(0.002)
                running.remove(name)
            done[name] += 1

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(work, "a")
            tg.start_soon(work, "b")
    assert overlaps == 0
    assert done == {"a": 8, "b": 8}


@pytest.mark.unit
@pytest.mark.anyio
async def test_runner_charges_what_the_caller_measured() -> None:
    clock = [5.0]
    runner = TokenRunner(TokenArbiter(10.0), clock=lambda: clock[0])
    runner.arbiter.add("a", 0.5)
    async with runner.turn("a") as turn:
        clock[0] += 1.0  # a second of wall time, of which the device worked 0.25 s
        turn.used_s = 0.25
    assert runner.arbiter.used_s("a", clock[0]) == pytest.approx(0.25)
    async with runner.turn("a"):
        clock[0] += 0.5  # unmeasured: the wall time is charged
    assert runner.arbiter.used_s("a", clock[0]) == pytest.approx(0.75)


@pytest.mark.unit
@pytest.mark.anyio
async def test_a_cancelled_wait_withdraws_so_nobody_waits_on_it() -> None:
    runner = TokenRunner(TokenArbiter(10.0))
    for name in "abc":
        runner.arbiter.add(name, 0.3)
    release = anyio.Event()

    async def hold() -> None:
        async with runner.turn("a"):
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.sleep(0.01)
        with anyio.move_on_after(0.05):
            async with runner.turn("b"):
                pytest.fail("b cannot get the device while a holds it")
        assert "b" not in runner.arbiter.waiting(runner.clock())
        release.set()
    with anyio.fail_after(1):
        async with runner.turn("c"):
            pass
