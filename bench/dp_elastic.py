"""Memory held over a bursty load: the elastic pool vs a static pool sized for the peak.

Simulated time, the real policy code: LeaseTable for placement, ElasticPool for
sizing. The trace is a steady trickle with periodic bursts of intermediates
(2-32 MiB, lifetimes around half a second). Three pools serve the same trace:
the elastic pool, a grow-only pool (what a caching allocator does: it keeps
whatever it once needed) and the smallest static pool that serves the trace
without refusing a lease.

    .venv/bin/python -m bench.dp_elastic
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from dataclasses import dataclass, field

from bench.dp_common import IMG, GiB, MiB, machine, percentile, table
from bench.plotting import pyplot
from shared.dataplane.elastic import ElasticConfig, ElasticPool, SlabUse
from shared.dataplane.leases import Fault, LeaseError, LeaseTable

SLAB = 64 * MiB
CAP = 16 * GiB
DURATION = 600.0
TICK = 1.0


@dataclass(frozen=True)
class Request:
    at: float
    nbytes: int
    lifetime: float


def trace(seed: int = 1) -> list[Request]:
    rng = random.Random(seed)
    out: list[Request] = []
    t = 0.0
    while t < DURATION:
        # 15-second bursts at 80 req/s every two minutes, 4 req/s otherwise.
        burst = (t % 120.0) >= 100.0 and (t % 120.0) < 115.0
        t += rng.expovariate(80.0 if burst else 4.0)
        size = rng.choice((2, 4, 8, 8, 16, 32)) * MiB
        out.append(Request(t, size, 0.1 + rng.expovariate(1 / 0.4)))
    return out


@dataclass
class Outcome:
    name: str
    times: list[float] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    live: list[int] = field(default_factory=list)
    created: int = 0
    returned: int = 0
    rejected: int = 0

    def mean_held(self) -> float:
        total = sum(
            h * (t2 - t1)
            for (t1, t2), h in zip(itertools.pairwise(self.times), self.held, strict=False)
        )
        return total / (self.times[-1] - self.times[0])


def simulate(
    name: str, requests: list[Request], *, static_slabs: int = 0, cooldown_s: float = 30.0
) -> Outcome:
    table_ = LeaseTable()
    table_.add_device("cpu", CAP)
    pool = ElasticPool(ElasticConfig(slab_size=SLAB, max_bytes=CAP, cooldown_s=cooldown_s))
    out = Outcome(name)
    for _ in range(static_slabs):
        table_.add_slab("cpu", SLAB, "s")
    events: list[tuple[float, int, str, object]] = []
    for i, r in enumerate(requests):
        heapq.heappush(events, (r.at, i, "arrive", r))
    t = 0.0
    seq = len(requests)
    while t <= DURATION:
        seq += 1
        heapq.heappush(events, (t, seq, "tick", None))
        t += TICK

    def uses() -> list[SlabUse]:
        return [
            SlabUse(s.slab_id, s.size, table_.slab_used("cpu", s.slab_id))
            for s in table_.slabs("cpu")
        ]

    def apply(add: tuple[int, ...], remove: tuple[int, ...]) -> None:
        for size in add:
            table_.add_slab("cpu", size, "s")
            out.created += 1
        for slab_id in remove:
            table_.remove_slab("cpu", slab_id)
            out.returned += 1

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(payload, Request)
            try:
                lease = table_.lease(payload.nbytes, "cpu", "w", now=now)
            except LeaseError as exc:
                if exc.fault is not Fault.EXHAUSTED:
                    raise
                if static_slabs:
                    out.rejected += 1
                    continue
                apply(pool.grow_for(payload.nbytes, uses()).add, ())
                try:
                    lease = table_.lease(payload.nbytes, "cpu", "w", now=now)
                except LeaseError:
                    out.rejected += 1
                    continue
            pool.demand.observe_lease(now, payload.nbytes)
            seq += 1
            heapq.heappush(events, (now + payload.lifetime, seq, "release", lease.lease_id))
        elif kind == "release":
            assert isinstance(payload, str)
            freed = table_.release(payload, "w")
            assert freed is not None
            pool.demand.observe_release(freed.nbytes, now - freed.created_at)
        elif not static_slabs:
            plan = pool.plan(now, uses())
            apply(plan.add, plan.remove)
        usage = table_.usage("cpu")
        out.times.append(now)
        out.held.append(usage.alloc.held)
        out.live.append(usage.alloc.used)
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help; no options
    requests = trace()
    elastic = simulate("elastic (cool-down 30 s)", requests)
    patient = simulate("elastic (cool-down 120 s)", requests, cooldown_s=120.0)
    grow_only = simulate("grow-only (caching allocator)", requests, cooldown_s=math.inf)
    slabs = math.ceil(max(elastic.live) / SLAB)
    while (static := simulate(f"static ({slabs} slabs)", requests, static_slabs=slabs)).rejected:
        slabs += 1
    live_mean = sum(
        lv * (t2 - t1)
        for (t1, t2), lv in zip(itertools.pairwise(elastic.times), elastic.live, strict=False)
    ) / (elastic.times[-1] - elastic.times[0])
    rows: list[list[object]] = []
    for o in (static, grow_only, patient, elastic):
        rows.append(
            [
                o.name,
                o.mean_held() / MiB,
                percentile(o.held, 95) / MiB,
                max(o.held) / MiB,
                o.mean_held() / static.mean_held(),
                o.mean_held() / live_mean,
                o.created,
                o.returned,
                o.rejected,
            ]
        )
    print(
        f"machine: {machine()}; simulated {DURATION:.0f} s, {len(requests)} leases, "
        f"slab {SLAB // MiB} MiB, mean live {live_mean / MiB:.0f} MiB, "
        f"peak live {max(elastic.live) / MiB:.0f} MiB"
    )
    print(
        table(
            [
                "pool",
                "mean held MiB",
                "p95 held MiB",
                "peak held MiB",
                "held / static",
                "held / live",
                "slabs created",
                "slabs returned",
                "leases refused",
            ],
            rows,
        )
    )
    plot(static, grow_only, elastic)


def plot(*outcomes: Outcome) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for o in outcomes:
        ax.step(o.times, [h / MiB for h in o.held], where="post", label=f"held: {o.name}")
    last = outcomes[-1]
    ax.step(
        last.times,
        [lv / MiB for lv in last.live],
        where="post",
        label="live leases",
        linewidth=0.6,
        color="grey",
    )
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("MiB")
    ax.set_title("Pool memory over a bursty load")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "dp_elastic.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
