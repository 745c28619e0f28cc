"""Azure-Functions-like workloads: who is called, how often, how big the models are.

Arrivals (Shahrad et al.'s Azure traces in shape, not in numbers):
  * popularity: function i (0-based) gets a share proportional to 1/(i+1)^zipf_s;
  * burstiness: a two-state Markov-modulated Poisson process (on/off) scales the
    total rate, and each arrival brings a geometric cluster of follow-ups of the
    same function a few ms apart (a Neyman-Scott process): per-function bursts;
  * diurnal: the rate is multiplied by 1 + A*sin(2*pi*t/period).
Models: sizes log-normal around `median_model_bytes`, rescaled so their total is
`total_model_bytes` (set it to a multiple of the cache), each capped at
`max_model_bytes` so it fits a device. Exec time grows with size (see
calibration.py). Everything comes from one seeded numpy Generator, and a trace
round-trips through a CSV of (time_s, function) rows.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gfaas.sim.calibration import CALIBRATION, Calibration


@dataclass(frozen=True, slots=True)
class FunctionProfile:
    name: str
    model: str
    model_bytes: int
    exec_s: float  # warm, alone on the device
    slo_s: float
    share: float  # fraction of all calls


@dataclass(frozen=True, slots=True)
class Arrival:
    time_s: float
    function: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSpec:
    n_functions: int = 35
    duration_s: float = 60.0
    rate: float = 100.0  # mean requests/s over the whole trace, bursts included
    zipf_s: float = 1.0
    # On/off modulation: mean sojourns and the rate multiplier while "on".
    on_s: float = 2.0
    off_s: float = 6.0
    on_boost: float = 3.0
    burst_mean: float = 2.0  # mean requests per per-function cluster
    burst_gap_s: float = 0.005
    diurnal_amplitude: float = 0.3
    diurnal_period_s: float = 0.0  # 0: one "day" per trace
    total_model_bytes: int = 0  # 0: no rescaling
    median_model_bytes: int = 250_000_000
    model_sigma: float = 0.8
    max_model_bytes: int = 2_000_000_000
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Workload:
    functions: list[FunctionProfile]
    arrivals: list[Arrival]

    def by_name(self) -> dict[str, FunctionProfile]:
        return {f.name: f for f in self.functions}


def generate(spec: WorkloadSpec, calibration: Calibration = CALIBRATION) -> Workload:
    rng = np.random.default_rng(spec.seed)
    functions = make_functions(spec, rng, calibration)
    return Workload(functions, make_arrivals(spec, functions, rng))


def make_functions(
    spec: WorkloadSpec, rng: np.random.Generator, calibration: Calibration = CALIBRATION
) -> list[FunctionProfile]:
    n = spec.n_functions
    ranks = np.arange(1, n + 1, dtype=float)
    shares = ranks**-spec.zipf_s
    shares /= shares.sum()
    sizes = rng.lognormal(math.log(spec.median_model_bytes), spec.model_sigma, n)
    sizes = _fit_total(sizes, spec.total_model_bytes, spec.max_model_bytes)
    # Popularity is independent of size: shuffle which size goes to which rank.
    sizes = rng.permutation(sizes)
    jitter = rng.lognormal(0.0, 0.2, n)
    functions = []
    for i in range(n):
        size = int(sizes[i])
        exec_s = calibration.exec_s(size) * float(jitter[i])
        functions.append(
            FunctionProfile(
                name=f"fn{i:04d}",
                model=f"model{i:04d}",
                model_bytes=size,
                exec_s=exec_s,
                slo_s=calibration.slo_s(size, exec_s),
                share=float(shares[i]),
            )
        )
    return functions


def _fit_total(sizes: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Scale sizes to sum to `total` with none above `cap` (water-filling)."""
    sizes = np.minimum(sizes, cap)
    if total <= 0:
        return sizes
    if total > cap * len(sizes):
        raise ValueError(f"{len(sizes)} models of at most {cap} B cannot total {total} B")
    for _ in range(64):
        free = sizes < cap
        short = total - sizes.sum()
        if abs(short) < 1.0 or not free.any():
            break
        sizes[free] *= 1.0 + short / sizes[free].sum()
        sizes = np.minimum(sizes, cap)
    return sizes


def make_arrivals(
    spec: WorkloadSpec, functions: Sequence[FunctionProfile], rng: np.random.Generator
) -> list[Arrival]:
    duration = spec.duration_s
    period = spec.diurnal_period_s or duration
    on_frac = spec.on_s / (spec.on_s + spec.off_s)
    mean_mod = on_frac * spec.on_boost + (1.0 - on_frac)
    # Clusters arrive at `base`; each brings `burst_mean` requests on average.
    base = spec.rate / (spec.burst_mean * mean_mod)
    peak = base * spec.on_boost * (1.0 + abs(spec.diurnal_amplitude))
    # Thinning: candidates at the peak rate, kept with probability rate(t)/peak.
    count = rng.poisson(peak * duration)
    times = np.sort(rng.uniform(0.0, duration, count))
    boost = _on_off(times, spec, rng)
    diurnal = 1.0 + spec.diurnal_amplitude * np.sin(2.0 * math.pi * times / period)
    keep = rng.uniform(0.0, peak, count) < base * boost * diurnal
    starts = times[keep]
    shares = np.array([f.share for f in functions])
    who = rng.choice(len(functions), size=len(starts), p=shares / shares.sum())
    sizes = rng.geometric(1.0 / max(spec.burst_mean, 1.0), len(starts))
    # Follow-ups trail their cluster's start by exponential gaps; the first is on time.
    gaps = rng.exponential(spec.burst_gap_s, int(sizes.sum()))
    first = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    gaps[first] = 0.0
    elapsed = np.cumsum(gaps)
    all_times = np.repeat(starts, sizes) + elapsed - np.repeat(elapsed[first], sizes)
    all_who = np.repeat(who, sizes)
    inside = all_times < duration
    order = np.argsort(all_times[inside], kind="stable")
    names = [f.name for f in functions]
    return [
        Arrival(round(float(t), 6), names[int(i)])
        for t, i in zip(all_times[inside][order], all_who[inside][order], strict=True)
    ]


def _on_off(times: np.ndarray, spec: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    """The on/off multiplier at each (sorted) time."""
    edges = [0.0]
    on = bool(rng.uniform() < spec.on_s / (spec.on_s + spec.off_s))
    states = [on]
    while edges[-1] < spec.duration_s:
        edges.append(edges[-1] + rng.exponential(spec.on_s if on else spec.off_s))
        on = not on
        states.append(on)
    which = np.searchsorted(np.array(edges), times, side="right") - 1
    boost = np.where(np.array(states)[which], spec.on_boost, 1.0)
    return np.asarray(boost, dtype=float)


def write_csv(path: Path, arrivals: Sequence[Arrival]) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["time_s", "function"])
        for a in arrivals:
            out.writerow([repr(a.time_s), a.function])


def read_csv(path: Path) -> list[Arrival]:
    with path.open(newline="") as f:
        rows = csv.DictReader(f)
        return [Arrival(float(r["time_s"]), r["function"]) for r in rows]
