"""Spatial sharing: disjoint cores on a CPU (measured for real), MPS on a GPU."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from services.gpu_worker.profiler import sm_grid
from shared.scheduling import packing
from shared.sharing import ShareError
from shared.sharing.cpu import assign_cores, cores_at, cores_for, node_cores, pin
from shared.sharing.mps import (
    MpsDirs,
    MpsUnavailable,
    client_env,
    probe,
    start_daemon,
    stop_daemon,
    thread_percentage,
)

# -- CPU cores -----------------------------------------------------------------------


@pytest.mark.unit
def test_instances_get_disjoint_cores_rounded_up_and_at_least_one() -> None:
    got = assign_cores(range(8), {"a": 0.5, "b": 0.2, "c": 0.01})
    assert got == {"a": frozenset({0, 1, 2, 3}), "b": frozenset({4, 5}), "c": frozenset({6})}
    assert cores_for(0.7, 10) == 7  # 0.7 * 10 is 7.000000000000001 in floats
    with pytest.raises(ShareError, match="above 0"):
        cores_for(0.0, 4)


@pytest.mark.unit
@pytest.mark.parametrize("cores", range(1, 33))
def test_every_profiled_core_share_can_be_placed_on_its_cores(cores: int) -> None:
    # On 3 cores the grid was 1/3, 2/3 and 1: rows the packer, in whole percent,
    # refuses (ValueError), so a plan that chose one failed every round, and the
    # function was never placed.
    grid = sm_grid("cpu", cores)
    assert grid[-1] == 1.0
    for share in grid:
        packing.units(share)
        # Side by side from the left, instances of that share get disjoint cores.
        width = round(share * packing.UNITS)
        slots = [
            cores_at(x / packing.UNITS, share, range(cores))
            for x in range(0, packing.UNITS - width + 1, width)
        ]
        assert sum(len(s) for s in slots) == len(frozenset().union(*slots)), (share, slots)


def _splits(rng: random.Random, parts: int) -> list[tuple[int, int]]:
    """`parts` side-by-side slots (offset, width) in whole percent, gaps allowed."""
    cuts = sorted(rng.sample(range(1, packing.UNITS), 2 * parts - 1))
    edges = [0, *cuts, packing.UNITS]
    slots = [(edges[i], edges[i + 1]) for i in range(0, len(edges) - 1)]
    # Every other interval is a slot, the rest gaps (sometimes none).
    chosen = slots[:: rng.choice((1, 2))][:parts]
    return [(a, b - a) for a, b in chosen]


@pytest.mark.unit
@pytest.mark.parametrize("cores", range(1, 17))
def test_side_by_side_slots_get_disjoint_cores_for_any_split(cores: int) -> None:
    # 0.3 + 0.7 on 2 cores was {0} and {0, 1}; 0.5 + 0.5 on 3, {0, 1} and {1, 2}:
    # each slot's count was rounded up, then the slot shifted left to fit.
    rng = random.Random(cores)
    pool = range(10, 10 + cores)  # not 0-based: a cpuset need not be
    splits = [_splits(rng, parts) for parts in (2, 3, 4, 5) for _ in range(300)]
    splits += [[(0, 30), (30, 70)], [(0, 25), (25, 50), (75, 25)], [(0, 50), (50, 50)]]
    for split in splits:
        got = [cores_at(x / packing.UNITS, w / packing.UNITS, pool) for x, w in split]
        for (_, w), have in zip(split, got, strict=True):
            assert have, (split, got)
            assert have <= set(pool), (split, got)
            worth = w * cores / packing.UNITS  # the cores the slot spans
            assert len(have) < worth + 1, (split, got)
            assert len(have) > worth - 1 or worth < 1, (split, got)
            if (w * cores) % packing.UNITS == 0:
                assert len(have) == w * cores // packing.UNITS, (split, got)  # exactly
        for (a, ca), (b, cb) in itertools.combinations(zip(split, got, strict=True), 2):
            # Slots at least a core wide never share one, wherever they sit.
            if min(a[1], b[1]) * cores >= packing.UNITS:
                assert not ca & cb, (split, got)
        if len(split) <= cores and all(w * cores >= packing.UNITS for _, w in split):
            assert sum(map(len, got)) == len(frozenset().union(*got)), (split, got)
    # Stacked in time (the same slot): the same cores.
    assert cores_at(0.3, 0.4, pool) == cores_at(0.3, 0.4, pool)


@pytest.mark.unit
def test_uneven_shares_the_packer_places_side_by_side_share_no_core() -> None:
    def row(shares: list[float], cores: int) -> list[frozenset[int]]:
        offsets = itertools.accumulate([0.0, *shares[:-1]])
        return [cores_at(x, s, range(cores)) for x, s in zip(offsets, shares, strict=True)]

    assert row([0.3, 0.7], 2) == [{0}, {1}]
    assert row([0.3, 0.7], 3) == [{0}, {1, 2}]
    assert row([0.5, 0.5], 3) == [{0}, {1, 2}]  # core 1's middle is at 0.5
    assert row([0.25, 0.5, 0.25], 3) == [{0}, {1}, {2}]
    assert row([0.25, 0.5, 0.25], 4) == [{0}, {1, 2}, {3}]
    assert row([0.1, 0.2, 0.7], 10) == [{0}, {1, 2}, set(range(3, 10))]
    # Fewer cores than slots: each still gets one, so some must share.
    assert row([0.25, 0.5, 0.25], 2) == [{0}, {0}, {1}]
    assert row([0.5, 0.5], 1) == [{0}, {0}]
    # A slot past the end of the row is the caller's mistake, not a shifted slot.
    with pytest.raises(ShareError, match="past the end"):
        cores_at(0.5, 0.6, range(4))
    assert cores_at(0.75, 0.25 + 1e-9, range(4)) == {3}  # float noise is not a mistake


@pytest.mark.unit
def test_a_share_is_refused_when_the_cores_are_exhausted() -> None:
    with pytest.raises(ShareError, match=r"c needs 1 of the node's 2 cores .* 0 are left"):
        assign_cores([4, 5], {"a": 0.5, "b": 0.5, "c": 0.1})


@pytest.mark.unit
def test_running_instances_keep_their_cores_when_another_arrives() -> None:
    current = {"a": frozenset({2, 3})}
    got = assign_cores(range(4), {"b": 0.5, "a": 0.5}, current)
    assert got == {"b": frozenset({0, 1}), "a": frozenset({2, 3})}
    # A share that changed size gets new cores.
    assert assign_cores(range(4), {"a": 0.25}, current) == {"a": frozenset({0})}


def _burn(rounds: int) -> None:
    # sha256 of a large buffer releases the GIL: threads run truly in parallel.
    data = b"x" * (1 << 20)
    for _ in range(rounds):
        hashlib.sha256(data).digest()


def _parallelism(cores_a: frozenset[int], cores_b: frozenset[int], rounds: int) -> float:
    """How many of two threads, pinned to these cores and burning `rounds` each, ran
    at once on average: their CPU time over the wall time (2: always both, 1: in turn)."""
    start = threading.Barrier(3)
    seen: list[frozenset[int]] = []
    cpu_s: list[float] = []

    def run(cores: frozenset[int]) -> None:
        pin(cores, torch_threads=False)  # this thread only; it ends with the test
        seen.append(frozenset(os.sched_getaffinity(0)))
        start.wait()
        began = time.thread_time()
        _burn(rounds)
        cpu_s.append(time.thread_time() - began)

    threads = [threading.Thread(target=run, args=(c,)) for c in (cores_a, cores_b)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    assert sorted(seen, key=sorted) == sorted([cores_a, cores_b], key=sorted)
    return sum(cpu_s) / wall


@pytest.mark.unit
@pytest.mark.skipif(len(node_cores()) < 2, reason="needs two cores")
def test_threads_on_disjoint_cores_run_side_by_side() -> None:
    first, second = sorted(node_cores())[:2]
    shares = assign_cores([first, second], {"a": 0.5, "b": 0.5})
    assert shares == {"a": frozenset({first}), "b": frozenset({second})}
    began = time.perf_counter()
    _burn(20)
    rounds = max(20, int(20 * 0.2 / (time.perf_counter() - began)))  # ~0.2 s each
    # Parallelism, not speed: on a VM the two cores may be one physical core's
    # hyperthreads, and other work may share them. CPU time above the wall time is
    # only possible if both threads ran at once; on one core it never is.
    apart, together = 0.0, 2.0
    for _ in range(3):
        apart = max(apart, _parallelism(shares["a"], shares["b"], rounds))
        together = min(together, _parallelism(shares["a"], shares["a"], rounds))
        if apart > 1.5:
            break
    assert apart > 1.1
    assert together < 1.05


# -- MPS -----------------------------------------------------------------------------


@pytest.mark.unit
def test_an_instance_environment_carries_its_sm_share(tmp_path: Path) -> None:
    dirs = MpsDirs.under(tmp_path)
    assert client_env(0.25, dirs) == {
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
    }
    assert thread_percentage(0.001) == 1
    assert thread_percentage(1.0) == 100
    for bad in (0.0, 1.2):
        with pytest.raises(ShareError, match="sm share"):
            client_env(bad, dirs)


@pytest.mark.unit
def test_without_mps_the_probe_says_time_sharing_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    dirs = MpsDirs.under(tmp_path)
    status = probe(dirs)
    assert (status.control, status.running, status.usable) == (None, False, False)
    assert "nvidia-cuda-mps-control is not on PATH" in status.reason
    assert "by time only" in status.reason
    with pytest.raises(MpsUnavailable, match="not on PATH"):
        start_daemon(dirs)
    stop_daemon(dirs)  # nothing runs: nothing to stop


FAKE_CONTROL = """#!/bin/sh
# Stands in for nvidia-cuda-mps-control: -d "starts" a daemon, quit on stdin stops it.
if [ "$1" = "-d" ]; then
    env | grep '^CUDA_' | sort > "$CUDA_MPS_LOG_DIRECTORY/env"
    mkfifo "$CUDA_MPS_PIPE_DIRECTORY/control"
    exit 0
fi
read command
[ "$command" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
"""


@pytest.fixture
def fake_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-cuda-mps-control"
    tool.write_text(FAKE_CONTROL)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tool


@pytest.mark.unit
def test_the_daemon_starts_for_its_directories_and_stops(
    fake_control: Path, tmp_path: Path
) -> None:
    dirs = MpsDirs.under(tmp_path / "mps")
    status = start_daemon(dirs, devices="1")
    assert status.usable
    assert status.reason == ""
    assert (dirs.log / "env").read_text().splitlines() == [
        f"CUDA_MPS_LOG_DIRECTORY={dirs.log}",
        f"CUDA_MPS_PIPE_DIRECTORY={dirs.pipe}",
        "CUDA_VISIBLE_DEVICES=1",
    ]
    assert start_daemon(dirs).usable  # already running: left as it is
    stop_daemon(dirs)
    assert not probe(dirs).running
    assert "no MPS daemon listens" in probe(dirs).reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None, reason="needs MPS")
def test_an_instance_process_runs_on_its_share_under_a_real_daemon() -> None:
    # Short paths: the daemon's pipes are unix sockets, whose paths are limited.
    root = Path(tempfile.mkdtemp(prefix="mps", dir="/tmp"))
    dirs = MpsDirs.under(root)
    start_daemon(dirs)
    try:
        code = "import torch; x = torch.ones(1024, 1024, device='cuda'); print((x @ x).sum())"
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **client_env(0.5, dirs)},
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    finally:
        stop_daemon(dirs)
        shutil.rmtree(root, ignore_errors=True)
