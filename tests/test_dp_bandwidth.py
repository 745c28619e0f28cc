from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shared.dataplane.bandwidth import LinkScheduler, Mode, TransferDone

pytestmark = pytest.mark.unit

MiB = 1 << 20
GiB = 1 << 30
RATE = 10 * GiB  # bytes/s: a chunk of 2 MiB takes about 0.2 ms


@dataclass(frozen=True)
class Arrival:
    at: float
    transfer_id: str
    nbytes: int
    weight: float = 1.0
    flow: str = ""
    deadline: float | None = None


@dataclass
class Run:
    done: dict[str, TransferDone] = field(default_factory=dict)
    bytes_at: dict[str, list[tuple[float, int]]] = field(default_factory=dict)


def simulate(sched: LinkScheduler, arrivals: list[Arrival], until: float = 10.0) -> Run:
    """A link that moves one chunk at a time at RATE, in simulated time."""
    pending = sorted(arrivals, key=lambda a: a.at)
    run = Run()
    now = 0.0
    sent: dict[str, int] = {}
    while now < until and (pending or sched.pending()):
        while pending and pending[0].at <= now:
            a = pending.pop(0)
            sched.submit(
                a.transfer_id,
                a.nbytes,
                now=now,
                weight=a.weight,
                flow=a.flow,
                deadline=a.deadline,
            )
        chunk = sched.next_chunk(now)
        if chunk is None:
            now = pending[0].at
            continue
        now += chunk.nbytes / RATE
        sent[chunk.transfer_id] = sent.get(chunk.transfer_id, 0) + chunk.nbytes
        run.bytes_at.setdefault(chunk.transfer_id, []).append((now, sent[chunk.transfer_id]))
        done = sched.complete(chunk, now)
        if done is not None:
            run.done[done.transfer_id] = done
    return run


def chunk_time(sched: LinkScheduler) -> float:
    return sched.chunk_bytes / RATE


def test_a_small_transfer_is_not_stuck_behind_a_big_one_when_sharing() -> None:
    sched = LinkScheduler("pcie0", capacity=RATE, mode=Mode.FAIR)
    run = simulate(sched, [Arrival(0.0, "big", GiB), Arrival(0.01, "small", MiB)])
    small = run.done["small"].latency_s
    assert small <= chunk_time(sched) + MiB / RATE + 1e-9
    assert run.done["big"].finished_at == pytest.approx((GiB + MiB) / RATE)


def test_a_small_transfer_waits_for_the_big_one_under_fifo() -> None:
    sched = LinkScheduler("pcie0", capacity=RATE, mode=Mode.FIFO)
    run = simulate(sched, [Arrival(0.0, "big", GiB), Arrival(0.01, "small", MiB)])
    assert run.done["small"].finished_at > run.done["big"].finished_at
    assert run.done["small"].latency_s > 50 * chunk_time(sched)


def test_spare_bandwidth_is_shared_by_weight() -> None:
    sched = LinkScheduler("pcie0", capacity=RATE, mode=Mode.FAIR)
    run = simulate(
        sched, [Arrival(0.0, "heavy", GiB, weight=3.0), Arrival(0.0, "light", GiB, weight=1.0)]
    )
    # While both are backlogged (until heavy ends), bytes go 3:1.
    end = run.done["heavy"].finished_at
    light = max(b for t, b in run.bytes_at["light"] if t <= end)
    assert GiB / light == pytest.approx(3.0, rel=0.02)


def test_a_minimum_rate_is_kept_against_a_heavier_competitor() -> None:
    sched = LinkScheduler("pcie0", capacity=RATE, mode=Mode.FAIR)
    # 256 MiB due in 60 ms needs 40% of the link; fair shares would give it 1/11.
    slo = Arrival(0.0, "slo", 256 * MiB, weight=1.0, deadline=0.06)
    run = simulate(sched, [Arrival(0.0, "bulk", GiB, weight=10.0), slo])
    assert run.done["slo"].finished_at <= 0.06
    assert sched.reserved_rate() == 0.0


def test_an_equal_split_alternates_chunks() -> None:
    sched = LinkScheduler("pcie0", capacity=RATE, chunk_bytes=MiB, mode=Mode.FAIR)
    sched.submit("a", 8 * MiB, now=0.0)
    sched.submit("b", 8 * MiB, now=0.0)
    order = []
    for _ in range(6):
        chunk = sched.next_chunk(0.0)
        assert chunk is not None
        order.append(chunk.transfer_id)
    assert order == ["a", "b", "a", "b", "a", "b"]


def test_chunks_cover_the_transfer_exactly() -> None:
    sched = LinkScheduler("pcie0", capacity=RATE, chunk_bytes=4 * MiB)
    sched.submit("t", 10 * MiB + 5, now=0.0)
    spans = []
    while (chunk := sched.next_chunk(0.0)) is not None:
        spans.append((chunk.offset, chunk.nbytes))
    assert spans == [(0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, 2 * MiB + 5)]


def test_bytes_are_accounted_per_flow_and_utilisation_per_link() -> None:
    sched = LinkScheduler("pcie0", capacity=RATE)
    simulate(
        sched,
        [
            Arrival(0.0, "a1", 8 * MiB, flow="resnet"),
            Arrival(0.0, "a2", 4 * MiB, flow="resnet"),
            Arrival(0.0, "b1", 2 * MiB, flow="bert"),
            Arrival(1.0, "b2", 2 * MiB, flow="bert"),
        ],
    )
    stats = sched.stats()
    assert stats.bytes_by_flow == {"resnet": 12 * MiB, "bert": 4 * MiB}
    assert stats.transfers_done == 4
    assert stats.busy_s == pytest.approx(16 * MiB / RATE)
    assert stats.utilisation == pytest.approx(stats.busy_s / (1.0 + 2 * MiB / RATE))
    assert stats.throughput == pytest.approx(RATE)


def test_admission_refuses_minimum_rates_beyond_the_link() -> None:
    sched = LinkScheduler("pcie0", capacity=RATE)
    sched.submit("t", GiB, now=0.0, deadline=0.2)  # half the link
    assert sched.admissible(GiB, now=0.0, deadline=0.25, compute_s=0.05)
    assert not sched.admissible(GiB, now=0.0, deadline=0.15, compute_s=0.0)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_a_weight_that_is_not_positive_and_finite_is_refused(weight: float) -> None:
    # NaN slipped past `weight <= 0`, inf took every turn of the link.
    with pytest.raises(ValueError, match="weight"):
        LinkScheduler("pcie0", capacity=RATE).submit("t", GiB, now=0.0, weight=weight)
