"""How fast an instance serves with a share of a GPU, and the profiles that follow.

The model (FaST-GShare's observations, in their simplest form):

* Space. A batch-1 request of a model keeps only part of a GPU's SMs busy. Up to
  the model's saturation share `sat`, throughput grows in proportion to the SM
  share; beyond it, more SMs do nothing. Service with share s:
  exec_s * max(1, sat / s), where exec_s is the time alone on a whole GPU.
* Saturation grows with the model: 6% + 50% per GB of weights, capped at 100%
  (a ~100 MB vision model saturates near 11%, BERT-large's 1.3 GB near 71%). An
  assumption in the shape of FaST-GShare's profiles, not a measurement.
* Time. A quota q holds the GPU for q of every token window, so service stretches
  to service / q (requests are longer than the part of the window they get, or
  queue behind the instance's own slot).
* Interference. Instances side by side share memory bandwidth and caches: a request
  is slowed by `interference` (10%) times the SM share other instances keep busy
  when it starts, counted only up to the SMs it leaves to them (`1 - s`): time
  slicing (s = 1) has no such overlap; its cost is the 1/q stretch.
* A profile is this model at the configurations FaST-GShare's profiler measures
  (time quotas 0.2..1.0 x SM shares 6..100%), alone, without interference: what a
  profiler would see. Service is deterministic, so its p99 is the service time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gfaas.sim.workload import FunctionProfile
from shared.scheduling.autoscale import Config, ProfilePoint

SM_SHARES = (0.06, 0.12, 0.24, 0.5, 0.6, 0.8, 1.0)
TIME_QUOTAS = (0.2, 0.4, 0.6, 0.8, 1.0)
GRID = tuple(Config(s, q) for s in SM_SHARES for q in TIME_QUOTAS)
# CUDA context, MPS client state and activations beside the weights (per instance).
CONTEXT_BYTES = 500_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareModel:
    sat_base: float = 0.06
    sat_per_gb: float = 0.5
    interference: float = 0.1

    def saturation(self, model_bytes: int) -> float:
        """The SM share beyond which the model runs no faster (batch 1)."""
        return min(1.0, self.sat_base + self.sat_per_gb * model_bytes / 1e9)

    def service_s(
        self, exec_s: float, saturation: float, config: Config, busy_others: float = 0.0
    ) -> float:
        """One request's service time; `busy_others`: SM share of co-located busy instances."""
        s = config.sm_share
        alone = exec_s * max(1.0, saturation / s) / config.time_quota
        overlap = min(max(busy_others, 0.0), 1.0 - s)
        return alone * (1.0 + self.interference * overlap)


DEFAULT_MODEL = ShareModel()


@dataclass(frozen=True, slots=True)
class SharedFunction:
    """A function as the sharing simulator sees it."""

    fn: FunctionProfile
    saturation: float
    memory: int  # bytes per instance
    profile: tuple[ProfilePoint, ...]

    @property
    def name(self) -> str:
        return self.fn.name


def profile_for(
    exec_s: float, saturation: float, model: ShareModel, grid: Sequence[Config] = GRID
) -> tuple[ProfilePoint, ...]:
    points = []
    for c in grid:
        service = model.service_s(exec_s, saturation, c)
        points.append(ProfilePoint(c, service * 1000.0, 1.0 / service))
    return tuple(points)


def whole_device(profile: Sequence[ProfilePoint]) -> tuple[ProfilePoint, ...]:
    """Only the configurations with all the SMs: time sharing alone."""
    return tuple(p for p in profile if p.config.sm_share == 1.0)


def shared_functions(
    functions: Sequence[FunctionProfile], model: ShareModel = DEFAULT_MODEL
) -> list[SharedFunction]:
    out = []
    for fn in functions:
        sat = model.saturation(fn.model_bytes)
        out.append(
            SharedFunction(
                fn, sat, fn.model_bytes + CONTEXT_BYTES, profile_for(fn.exec_s, sat, model)
            )
        )
    return out
