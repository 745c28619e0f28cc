"""`gfaas status` as a person reads it: one line per service instance, the figures that
say whether it is healthy. Pure formatting over the status details services report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _get(details: Mapping[str, Any], *path: str) -> Any:
    value: Any = details
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def summary(service: str, details: Mapping[str, Any]) -> str:
    """The few figures of one instance's details that matter at a glance."""
    if service == "scheduler":
        role = "active" if details.get("active") else "standby"
        workers = details.get("workers") or {}
        return (
            f"{role}, policy {details.get('policy')}, {len(workers)} workers, "
            f"{details.get('pending', 0)} queued, {details.get('assigned', 0)} placed"
        )
    if service == "ingress":
        return (
            f"{details.get('accepted', 0)} accepted, {details.get('rejected', 0)} rejected, "
            f"{details.get('unavailable', 0)} unavailable, "
            f"async {_get(details, 'async', 'completed') or 0} done / "
            f"{_get(details, 'async', 'retried') or 0} retried / "
            f"{_get(details, 'async', 'dead_lettered') or 0} dead, "
            f"{len(details.get('functions') or [])} functions"
        )
    if service == "gpu-worker":
        models = details.get("models") or []
        return (
            f"{details.get('device')}, {details.get('inflight', 0)} running, "
            f"{details.get('completed', 0)} done, {details.get('failed', 0)} failed, "
            f"models {', '.join(models) if models else '-'}"
        )
    if service == "memory-broker":
        return f"{details.get('leases', 0)} leases, {details.get('copies', 0)} copies"
    return ", ".join(f"{k} {v}" for k, v in details.items() if isinstance(v, int | float | str))


def table(rows: list[tuple[str, str, float, str]]) -> str:
    """(service, instance, uptime s, summary) rows as aligned text."""
    if not rows:
        return "no service answered"
    width_s = max(len("service"), *(len(r[0]) for r in rows))
    width_i = max(len("instance"), *(len(r[1]) for r in rows))
    lines = [f"{'service':{width_s}}  {'instance':{width_i}}  {'up':>8}  status"]
    for service, instance, uptime, text in rows:
        lines.append(f"{service:{width_s}}  {instance:{width_i}}  {uptime:7.0f}s  {text}")
    return "\n".join(lines)
