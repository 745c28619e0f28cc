"""Views of a live cluster built from what workers report and what the scheduler did.

The simulator knows its devices exactly; the live scheduler only hears heartbeats
every few hundred ms and sees completions. These pure functions turn that into
the same `WorkerView` / `DeviceCache` / `DeviceProfile` values the policies and
the simulator use:

* `reported_cache`: a worker's device tier as its heartbeat describes it (sizes,
  reload costs, popularity; models still swapping in are resident but not ready);
* `with_running`: that view after the invocations the scheduler has sent and not
  yet seen finish (the heartbeat may predate them), folded in with the planner's
  own `assume_assigned`, so a model just sent to a worker counts as resident there
  before the worker says so;
* `assume_finished`: the inverse step when a `Done` arrives;
* `fit_profile`: a device profile from measured (bytes, load seconds) samples;
* `ewma` and `alone_exec_s`: warm execution time per function from measured
  times, with the interference model's slowdown taken out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from shared.scheduling.base import DEFAULT_PROFILE, DeviceProfile, RequestView, WorkerView
from shared.scheduling.cache import DeviceCache, Entry
from shared.scheduling.dispatch import assume_assigned

# Bounds on a fitted link bandwidth (bytes/s): a load of a few bytes taking a
# millisecond must not turn into an absurd figure.
MIN_BANDWIDTH = 1e6
MAX_BANDWIDTH = 1e12


def reported_cache(
    capacity: int,
    sizes: Mapping[str, int],
    load_s: Mapping[str, float],
    scores: Mapping[str, float],
    loading: Iterable[str],
    now: float,
    profile: DeviceProfile = DEFAULT_PROFILE,
) -> DeviceCache:
    """A worker's device tier at `now`, unpinned (pins come from `with_running`).

    A model still loading is taken to be ready one swap-in from now: the
    heartbeat does not say when its swap-in began, so this errs towards late.
    """
    busy = set(loading)
    entries = {
        key: Entry(
            size=size,
            load_s=load_s.get(key, 0.0) or profile.swap_s(size),
            last_used=now,
            score=scores.get(key, 0.0),
            ready_at=now + profile.swap_s(size) if key in busy else 0.0,
        )
        for key, size in sizes.items()
    }
    return DeviceCache(capacity=capacity, entries=entries)


def with_running(worker: WorkerView, running: Iterable[RequestView], now: float) -> WorkerView:
    """`worker` (as reported, nothing outstanding) after accepting `running`."""
    view = replace(worker, outstanding=0)
    if view.cache is not None:
        loads = [e.ready_at for e in view.cache.entries.values() if e.ready_at > now]
        view = replace(
            view,
            resident=frozenset(view.cache.entries),
            memory_free=view.cache.free,
            link_busy_until=max([view.link_busy_until, *loads]),
        )
    for request in running:
        view = assume_assigned(view, request, now)
    return view


def assume_finished(worker: WorkerView, request: RequestView) -> WorkerView:
    """`worker` once `request` (assigned to it earlier) has left it."""
    cache = worker.cache
    key = request.cache_key
    if cache is not None and key in cache.entries and cache.entries[key].pins > 0:
        cache = cache.release(key)
    return replace(worker, outstanding=max(worker.outstanding - 1, 0), cache=cache)


def fit_profile(
    samples: Iterable[tuple[int, float]], base: DeviceProfile = DEFAULT_PROFILE
) -> DeviceProfile:
    """`base` with its swap cost fitted to measured (bytes, seconds) loads.

    Least squares of seconds = overhead + bytes / bandwidth when the samples span
    more than one size and the fit is sensible (positive slope, overhead >= 0);
    otherwise the bandwidth alone, keeping `base`'s overhead. No usable sample:
    `base` unchanged.
    """
    points = [(float(b), s) for b, s in samples if b >= 0 and s > 0.0]
    sized = [(b, s) for b, s in points if b > 0]
    if not sized:
        return base
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_s = sum(s for _, s in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    if var > 0.0:
        slope = sum((b - mean_b) * (s - mean_s) for b, s in points) / var
        overhead = mean_s - slope * mean_b
        if slope > 0.0 and overhead >= 0.0:
            return replace(base, link_bandwidth=_clamp(1.0 / slope), swap_overhead_s=overhead)
    moved = sum(b for b, _ in sized)
    spent = sum(max(s - base.swap_overhead_s, 1e-6) for _, s in sized)
    return replace(base, link_bandwidth=_clamp(moved / spent))


def _clamp(bandwidth: float) -> float:
    return min(max(bandwidth, MIN_BANDWIDTH), MAX_BANDWIDTH)


def ewma(previous: float, sample: float, alpha: float = 0.2, clip: float = 4.0) -> float:
    """Exponentially weighted mean; `previous` <= 0 means no sample yet.

    A sample above `clip` times the mean counts as `clip` times the mean: one
    stall (a worker descheduled on a busy host) must not make a function look
    slow for long, since an admitting policy that then refuses the function
    sees no new samples of it. A real slowdown still shows within a few samples.
    """
    if previous <= 0.0:
        return sample
    return (1.0 - alpha) * previous + alpha * min(sample, clip * previous)


def alone_exec_s(measured_s: float, co_runners: int, profile: DeviceProfile) -> float:
    """The warm time alone on the device of a run measured beside `co_runners`
    others (the inverse of `DeviceProfile.slowdown`)."""
    return measured_s / profile.slowdown(co_runners)
