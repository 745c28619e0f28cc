"""Placement policies: pure decisions over a view of the cluster.

The live scheduler service and the simulator call the same code. Nothing here does
I/O or reads a clock: time comes in as an argument. docs/architecture.md (step 3 of
an invocation) says how the scheduler uses them; docs/benchmarks.md section 3 measures them.
"""

from shared.scheduling.base import (
    POLICIES,
    Decision,
    DeviceProfile,
    Policy,
    Rejected,
    RequestView,
    WorkerView,
    decide,
    make_policy,
)
from shared.scheduling.cache import DeviceCache
from shared.scheduling.dispatch import DispatchPlan, assume_assigned, plan, plan_dispatch
from shared.scheduling.eviction import CannotFit, Victims, choose_victims
from shared.scheduling.slo import SloTracker, predict_latency, rrc

__all__ = [
    "POLICIES",
    "CannotFit",
    "Decision",
    "DeviceCache",
    "DeviceProfile",
    "DispatchPlan",
    "Policy",
    "Rejected",
    "RequestView",
    "SloTracker",
    "Victims",
    "WorkerView",
    "assume_assigned",
    "choose_victims",
    "decide",
    "make_policy",
    "plan",
    "plan_dispatch",
    "predict_latency",
    "rrc",
]
