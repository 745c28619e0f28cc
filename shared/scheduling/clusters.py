"""Each function's request clusters, measured from its arrival times (issue 8).

The autoscaler's burst floor models a function's requests as clusters (a client's
fan-out, a retry storm): sizes geometric with mean `mean`, the gaps between a
cluster's consecutive requests exponential with mean `gap` (`autoscale.burst_late`).
`ClusterEstimator` measures those two numbers online from the arrival times alone;
`shaped` puts them into the autoscaler's settings. The live scheduler and the
simulator feed it the same way: one estimator per function, an `add` per arrival.

How. Not by cutting the arrivals at a gap threshold: a threshold splits a cluster
whose gap exceeds it and merges clusters that overlap, and a busy function's
clusters do overlap (120 clusters/s of requests 5 ms apart do). Pairs instead. For
each arrival the estimator counts the earlier arrivals less than `reach_s` before
it (and their separations), and, as the background, the arrivals in the
`background_s` before that. Arrivals of independent clusters fall near an arrival
as often as the background says: what is left over, the excess, comes from its own
cluster. With geometric sizes of mean m an arrival has on average m - 1 earlier
arrivals of its cluster (E[K(K-1)] / (2 E[K]) = m - 1), and their separations
average m times the mean gap (the k-th before it is k gaps away, with weight
(1 - 1/m)^k). So
    mean = 1 + excess pairs per arrival,   gap = excess separation / excess pairs / mean,
unbiased for Poisson clusters whatever their overlap, and ~1 for Poisson arrivals.
The background window sits right before the near one so that a rate that swings
(on/off bursts of seconds) counts little as clustering: a rate modulated on a time
scale T adds about reach * Var(rate) / E[rate] * (reach + background) / T.

Bounds. `reach_s` (50 ms): clusters whose requests are further apart than that are
no burst to instances that serve in ms to tens of ms within SLOs of tens to
hundreds of ms; longer gaps are measured short. The statistics are over the last
`window` arrivals (a ring of per-arrival counts, their sums kept as it slides);
the recent arrivals kept for the counts are those within reach + background (at
most `max_recent`: at rates above that many per window the background is counted
over the span kept). Memory O(window + max_recent), O(1) amortised per arrival and
per `shape`. Times are the caller's (injected); they are kept in integer
microseconds, so the sums never drift. Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from shared.scheduling.autoscale import AutoscaleSettings

_US = 1_000_000


@dataclass(frozen=True, slots=True)
class ClusterShape:
    """A function's clusters as measured: what `AutoscaleSettings.burst_mean` and
    `burst_gap_ms` model."""

    mean: float  # requests per cluster (geometric sizes); 1: no clusters
    gap_s: float  # mean gap between a cluster's consecutive requests (0: none seen)
    arrivals: int  # how many arrivals it is measured over


class ClusterEstimator:
    """One function's cluster shape from its arrival times (`add`, in order)."""

    __slots__ = (
        "_bg",
        "_bg_pairs",
        "_cut",
        "_far",
        "_farther",
        "_first",
        "_held",
        "_hold",
        "_horizon",
        "_keep",
        "_last",
        "_max_recent",
        "_min",
        "_near",
        "_near_sum",
        "_pairs",
        "_reach",
        "_sep",
        "_weight",
    )

    def __init__(
        self,
        *,
        reach_s: float = 0.05,
        background_s: float = 0.1,
        horizon_s: float = 60.0,
        min_window: int = 256,
        min_arrivals: int = 50,
        max_recent: int = 4096,
        hold: tuple[float, float] = (0.15, 0.3),
    ) -> None:
        if min(reach_s, background_s, horizon_s) <= 0.0 or min(min_window, max_recent) < 1:
            raise ValueError("reach, background and horizon must be > 0, the counts >= 1")
        self._reach = max(round(reach_s * _US), 1)
        self._bg = max(round(background_s * _US), 1)
        self._horizon = horizon_s * _US
        self._keep = 1.0 - 1.0 / min_window
        self._min = min_arrivals
        self._max_recent = max_recent
        self._near: deque[int] = deque()  # arrivals within reach of the last one
        self._near_sum = 0
        self._far: deque[int] = deque()  # then those within the background before that
        self._farther: deque[int] = deque()  # and within the background before those
        self._first: int | None = None
        self._last = 0
        self._cut = -(2**62)  # the latest arrival dropped for max_recent (counts stop there)
        # Weighted sums over the arrivals counted: how many, the earlier ones within
        # reach of each, their separations (us), and the pairs the background expects.
        self._weight = 0.0
        self._pairs = 0.0
        self._sep = 0.0
        self._bg_pairs = 0.0
        self._hold = hold
        self._held: ClusterShape | None = None

    def add(self, time_s: float) -> None:
        """An arrival at `time_s` (a time earlier than the last counts as the last)."""
        now = max(round(time_s * _US), self._last)
        elapsed = now - self._last
        self._last = now
        if self._first is None:
            self._first = now
        near, far, farther = self._near, self._far, self._farther
        reach, bg = self._reach, self._bg
        while near and near[0] <= now - reach:
            t = near.popleft()
            self._near_sum -= t
            far.append(t)
        while far and far[0] <= now - reach - bg:
            farther.append(far.popleft())
        while farther and farther[0] <= now - reach - 2 * bg:
            farther.popleft()
        # The background windows: (now - reach - bg, now - reach] and the one before.
        span = (now - reach) - max(now - reach - bg, self._cut)
        span2 = (now - reach - bg) - max(now - reach - 2 * bg, self._cut)
        if now - reach - 2 * bg >= self._first and span > 0:
            # The rate near `now` from the two, in a straight line: a rate rising or
            # falling over them (a burst of the rate, not of a cluster) is not counted
            # as clusters. Where the cap cut the second short, the first alone.
            rate = len(far) / span
            if span2 > 0:
                # (Not clipped at 0 here: one arrival's count is noise, their sum is not.)
                rate += (rate - len(farther) / span2) * (reach + bg) / (2 * bg)
            # The window: the last `horizon_s`, and at least the last `min_window`
            # arrivals (a function called now and then keeps what it showed).
            keep = max(math.exp(-elapsed / self._horizon), self._keep)
            pairs = len(near)
            self._weight = self._weight * keep + 1.0
            self._pairs = self._pairs * keep + pairs
            self._sep = self._sep * keep + (pairs * now - self._near_sum)
            self._bg_pairs = self._bg_pairs * keep + rate * reach
        near.append(now)
        self._near_sum += now
        while len(near) + len(far) + len(farther) > self._max_recent:
            if farther:
                self._cut = farther.popleft()
            elif far:
                self._cut = far.popleft()
            else:
                self._cut = near.popleft()
                self._near_sum -= self._cut

    def shape(self) -> ClusterShape | None:
        """The clusters over the window; None while it holds under `min_arrivals`."""
        n = self._weight
        if n < max(self._min, 1) or n <= 0.0:
            return None
        excess = self._pairs - self._bg_pairs
        mean = 1.0 + max(excess / n, 0.0)
        gap = 0.0
        if excess > 0.0:
            # The background's pairs lie anywhere within reach: reach / 2 apart on average.
            sep = self._sep - self._bg_pairs * self._reach / 2.0
            gap = min(max(sep / excess / mean, 0.0), self._reach)
        return ClusterShape(mean=mean, gap_s=gap / _US, arrivals=round(n))

    def held(self) -> ClusterShape | None:
        """`shape`, held while it stays within `hold` (the mean within hold[0] of
        the one held, the gap within the fraction hold[1]): what to plan with. Each
        change of the burst model can move the plan to another configuration, and
        instances started for noise are started late for what they were meant for."""
        now = self.shape()
        held = self._held
        if now is None:
            return held
        if (
            held is None
            or abs(now.mean - held.mean) > self._hold[0]
            or abs(now.gap_s - held.gap_s) > self._hold[1] * max(held.gap_s, now.gap_s)
        ):
            self._held = held = now
        return held


def shaped(settings: AutoscaleSettings, shape: ClusterShape | None) -> AutoscaleSettings:
    """`settings` with a function's measured clusters as the burst model (None: as
    they are). Kingman's burstiness is at least that of such clusters (Poisson
    clusters of geometric sizes with mean m: ca^2 = 2m - 1, service deterministic).
    Rounded (the mean to 0.05, the gap to about 5%): the floors the autoscaler
    caches are reused, and noise in the measurement does not move the plan."""
    if shape is None:
        return settings
    mean = round(shape.mean * 20.0) / 20.0
    gap_ms = _round_log(shape.gap_s * 1000.0)
    if mean <= 1.0:
        return replace(settings, burst_mean=1.0, burst_gap_ms=gap_ms)
    return replace(
        settings,
        burst_mean=mean,
        burst_gap_ms=gap_ms,
        burstiness=max(settings.burstiness, 2.0 * mean - 1.0),
    )


def _round_log(x: float, steps_per_decade: int = 48) -> float:
    """`x` to one of `steps_per_decade` values a decade (about 5% apart); 0 stays 0."""
    if x <= 0.0:
        return 0.0
    k = round(math.log10(x) * steps_per_decade)
    return float(f"{10.0 ** (k / steps_per_decade):.4g}")
