"""Temporal sharing of one device: a token arbiter, after FaST-GShare (and Gemini).

Time on the device is cut into windows (100 ms, say). Each instance has three shares
of a window, as fractions: `minimum` is guaranteed to it while it is busy (the
minimums on a device sum to at most 1), `base` is its share when every instance is
busy (time goes in proportion to base), and `maximum` caps it: time that idle
instances leave unused is lent to busy ones up to their maximum, so the device never
idles while work waits, and it is theirs again as soon as they ask.

An instance runs a batch only while it holds a grant, and charges the time the batch
took (the caller measures it: CUDA events on a GPU, thread CPU time on a CPU), which
ends the grant. Gating whole batches rather than kernel launches, as FaST-GShare
does, needs no CUDA interception. Holders run together only while their spatial
shares (`sm`) sum to at most 1: with the default of 1, one at a time.

Pure: every call takes the time, so the simulator and the tests drive it with a
clock of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from shared.sharing import ShareError

EPS = 1e-9
# FaST-GShare's quotas follow bursts: half the last burst, half the previous quota.
BURST_WEIGHT = 0.5


@dataclass(frozen=True, slots=True)
class Shares:
    """One instance's shares of a device, as fractions (of a window; `sm` of the SMs)."""

    base: float
    minimum: float = 0.0
    maximum: float = 1.0
    sm: float = 1.0

    def problem(self) -> str | None:
        """Why these shares are not valid, or None."""
        if not (0.0 <= self.minimum <= self.base <= self.maximum <= 1.0 and self.base > 0.0):
            return (
                f"shares need 0 <= minimum <= base <= maximum <= 1 and base > 0, got "
                f"minimum {self.minimum}, base {self.base}, maximum {self.maximum}"
            )
        if not 0.0 < self.sm <= 1.0:
            return f"sm share {self.sm} must be above 0 and at most 1"
        return None


@dataclass(frozen=True, slots=True)
class Grant:
    """Run now. `slice_s` is how long the instance may expect to hold the device
    before charging (a budget for its batch): its adaptive quota, within what it may
    still use this window. A batch that runs longer is charged in full all the same."""

    slice_s: float


class Why(StrEnum):
    HELD = "held"  # holders leave no room for this instance's spatial share
    BEHIND = "behind"  # an instance that ranks ahead of it waits
    CAPPED = "capped"  # it used its maximum of this window


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Ask again at `at` (the clock of the calls), or sooner when a holder charges."""

    at: float
    why: Why


@dataclass(slots=True)
class _Instance:
    shares: Shares
    quota_s: float  # the adaptive token length
    window: int = 0  # the window `used_s` is counted in
    used_s: float = 0.0
    holding: bool = False
    # Since when it waits for a grant, and when it last asked (None: not waiting).
    asked_first: float | None = None
    asked_last: float = -math.inf
    released_at: float = -math.inf


class TokenArbiter:
    """The token arbiter of one device. Instances are named by strings.

    Ranking, when several want the device: instances below their minimum first
    (least served first), then by time used over base (so busy instances share in
    proportion to base), then whoever asked first. An instance that charged less
    than `linger_s` ago counts as asking: a busy one asks again at once, and the
    instances behind it must not slip in between its batches.
    """

    def __init__(
        self,
        window_s: float = 0.1,
        *,
        min_quota_s: float | None = None,
        linger_s: float | None = None,
    ) -> None:
        if window_s <= 0.0:
            raise ShareError(f"window_s {window_s} must be positive")
        self.window_s = window_s
        self.min_quota_s = window_s / 100.0 if min_quota_s is None else min_quota_s
        self.linger_s = window_s / 100.0 if linger_s is None else linger_s
        self._instances: dict[str, _Instance] = {}

    # -- membership ------------------------------------------------------------------

    def add(
        self,
        instance: str,
        base: float,
        minimum: float = 0.0,
        maximum: float = 1.0,
        *,
        sm: float = 1.0,
    ) -> None:
        """Give `instance` these shares; ShareError with the reason if it cannot have
        them (bad fractions, a name already here, minimums over the whole window)."""
        shares = Shares(base=base, minimum=minimum, maximum=maximum, sm=sm)
        reason = self.refusal(instance, shares)
        if reason is not None:
            raise ShareError(reason)
        self._instances[instance] = _Instance(shares=shares, quota_s=base * self.window_s)

    def refusal(self, instance: str, shares: Shares) -> str | None:
        """Why `add` would refuse these shares, or None: for a placement to ask first."""
        if instance in self._instances:
            return f"{instance} already has shares of this device"
        problem = shares.problem()
        if problem is not None:
            return f"{instance}: {problem}"
        guaranteed = self.guaranteed + shares.minimum
        if guaranteed > 1.0 + EPS:
            return (
                f"{instance}: minimum {shares.minimum:g} would bring the guaranteed quotas "
                f"of this device to {guaranteed:.2f} of the window, over 1"
            )
        return None

    def remove(self, instance: str) -> None:
        """Forget `instance` (stopped or dead); a grant it held ends with it."""
        self._instances.pop(instance, None)

    @property
    def guaranteed(self) -> float:
        """The minimums on this device, summed: at most 1."""
        return sum(i.shares.minimum for i in self._instances.values())

    def __contains__(self, instance: object) -> bool:
        return instance in self._instances

    def shares(self, instance: str) -> Shares:
        return self._get(instance).shares

    # -- grants ----------------------------------------------------------------------

    def request(self, instance: str, now: float) -> Grant | WaitUntil:
        """A grant for `instance` now, or when to ask again. It counts as waiting
        (others may rank behind it) until granted, `withdraw`n, or it stops asking
        for a window."""
        me = self._get(instance)
        if me.holding:
            raise ShareError(f"{instance} already holds a grant: charge it first")
        self._roll_all(now)
        if me.asked_first is None:
            me.asked_first = now
        me.asked_last = now
        next_window = (self._window(now) + 1) * self.window_s
        cap = me.shares.maximum * self.window_s
        if me.used_s >= cap - EPS:
            return WaitUntil(next_window, Why.CAPPED)
        held = sum(i.shares.sm for i in self._instances.values() if i.holding)
        if held + me.shares.sm > 1.0 + EPS:
            return WaitUntil(next_window, Why.HELD)
        mine = self._rank(instance, me)
        ahead = [
            (name, other)
            for name, other in self._instances.items()
            if other is not me and self._contends(other, now) and self._rank(name, other) < mine
        ]
        if ahead:
            # Woken by the holder's charge if one ahead runs; by its linger's end if it
            # merely lingers and does not ask again.
            at = min(self._asking_until(other) for _, other in ahead)
            return WaitUntil(min(at, next_window), Why.BEHIND)
        me.holding = True
        me.asked_first = None
        return Grant(slice_s=max(min(me.quota_s, cap - me.used_s), 0.0))

    def withdraw(self, instance: str) -> None:
        """`instance` no longer waits (its caller gave up): nobody ranks behind it."""
        me = self._instances.get(instance)
        if me is not None and not me.holding:
            me.asked_first = None
            me.asked_last = -math.inf

    def charge(self, instance: str, used_s: float, now: float) -> None:
        """End `instance`'s grant, charging `used_s` of device time to this window."""
        me = self._get(instance)
        if not me.holding:
            raise ShareError(f"{instance} holds no grant to charge")
        if not used_s >= 0.0:
            raise ShareError(f"{instance}: used time {used_s} must not be negative")
        me.holding = False
        self._roll(me, now)
        me.used_s += used_s
        me.released_at = now
        cap = me.shares.maximum * self.window_s
        burst = BURST_WEIGHT * used_s + (1.0 - BURST_WEIGHT) * me.quota_s
        me.quota_s = min(max(burst, min(self.min_quota_s, cap)), cap)

    # -- what it knows ---------------------------------------------------------------

    def used_s(self, instance: str, now: float) -> float:
        """Time `instance` was charged in the window of `now` (overruns carried in)."""
        me = self._get(instance)
        self._roll(me, now)
        return me.used_s

    def quota_s(self, instance: str) -> float:
        """Its adaptive token length: what its next grant's slice is at most."""
        return self._get(instance).quota_s

    def holders(self) -> list[str]:
        return [name for name, i in self._instances.items() if i.holding]

    def waiting(self, now: float) -> list[str]:
        return [name for name, i in self._instances.items() if self._asks(i, now)]

    # -- internals -------------------------------------------------------------------

    def _get(self, instance: str) -> _Instance:
        try:
            return self._instances[instance]
        except KeyError:
            raise ShareError(f"{instance} has no shares of this device") from None

    def _window(self, now: float) -> int:
        window = math.floor(now / self.window_s)
        # Division rounds (4.3 / 0.1 is 42.99...): keep start <= now < end exactly,
        # so that a WaitUntil for the next window is always in the future.
        if (window + 1) * self.window_s <= now:
            window += 1
        elif window * self.window_s > now:
            window -= 1
        return window

    def _roll(self, inst: _Instance, now: float) -> None:
        window = self._window(now)
        if window > inst.window:
            # A batch that ran past the instance's maximum is paid for out of the
            # next windows' maximums, so long batches earn no extra time.
            allowance = (window - inst.window) * inst.shares.maximum * self.window_s
            inst.used_s = max(inst.used_s - allowance, 0.0)
            inst.window = window

    def _roll_all(self, now: float) -> None:
        for inst in self._instances.values():
            self._roll(inst, now)

    def _asks(self, inst: _Instance, now: float) -> bool:
        # A waiter asks again at least once a window (every WaitUntil is at most the
        # next window's start); one that stopped asking, gave up without a withdraw.
        return inst.asked_first is not None and now - inst.asked_last <= self.window_s + EPS

    def _lingers(self, inst: _Instance, now: float) -> bool:
        return now < inst.released_at + self.linger_s

    def _asking_until(self, inst: _Instance) -> float:
        return inst.released_at + self.linger_s if inst.asked_first is None else math.inf

    def _contends(self, inst: _Instance, now: float) -> bool:
        if inst.holding or inst.used_s >= inst.shares.maximum * self.window_s - EPS:
            return False
        return self._asks(inst, now) or self._lingers(inst, now)

    def _rank(self, name: str, inst: _Instance) -> tuple[int, float, float, str]:
        s, w = inst.shares, self.window_s
        since = inst.asked_first if inst.asked_first is not None else inst.released_at
        if inst.used_s < s.minimum * w - EPS:
            return (0, inst.used_s / (s.minimum * w), since, name)
        return (1, inst.used_s / (s.base * w), since, name)
