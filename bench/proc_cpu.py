"""CPU time of process trees, from /proc: what a benchmark's servers spent per call,
a figure this machine's scheduling noise moves far less than latency does."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system seconds) of one process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * _TICK_S


def tree_cpu(roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process with all its descendants (the
    live ones: a child that has exited and been reaped no longer counts)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    owner = {pid: name for name, pid in roots.items()}

    def root_of(pid: int) -> str | None:
        seen = 0
        while pid not in owner and pid in stats and seen < 64:
            pid, seen = stats[pid][0], seen + 1
        return owner.get(pid)

    used = dict.fromkeys(roots, 0.0)
    for pid, (_, seconds) in stats.items():
        name = root_of(pid)
        if name is not None:
            used[name] += seconds
    return used


def per_call_ms(
    before: Mapping[str, float], after: Mapping[str, float], calls: float
) -> dict[str, float]:
    """CPU milliseconds per call of each tree between two `tree_cpu` readings."""
    return {name: (after[name] - before[name]) * 1e3 / max(calls, 1.0) for name in after}
