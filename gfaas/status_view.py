"""`gfaas status` as a person reads it: one line per service instance, the figures that
say whether it is healthy. Pure formatting over the status details services report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MB = 1024 * 1024


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
        line = (
            f"{details.get('device')}, {details.get('inflight', 0)} running, "
            f"{details.get('completed', 0)} done, {details.get('failed', 0)} failed, "
            f"models {', '.join(models) if models else '-'}"
        )
        if details.get("function"):
            return f"instance of {details['function']}: {line}"
        agent = details.get("agent")
        if isinstance(agent, Mapping):
            line += (
                f"; agent: {len(agent.get('instances') or [])} instances, "
                f"{(agent.get('memory_used') or 0) // MB} of "
                f"{(agent.get('memory_total') or 0) // MB} MiB, spatial {agent.get('spatial')}"
            )
        return line
    if service == "memory-broker":
        return f"{details.get('leases', 0)} leases, {details.get('copies', 0)} copies"
    return ", ".join(f"{k} {v}" for k, v in details.items() if isinstance(v, int | float | str))


def instances_table(live: Mapping[str, Any]) -> str:
    """The scheduler's `instances.live`: one line per function instance."""
    rows = [(function, i) for function, items in sorted(live.items()) for i in items or []]
    if not rows:
        return "no function instances"
    lines = [
        f"{'function':20} {'instance':22} {'device':8} {'state':9} {'mem MiB':>7} "
        f"{'sm':>5} {'time':>5} {'running':>7}"
    ]
    for function, i in rows:
        lines.append(
            f"{function:20} {i.get('instance', '')!s:22} {i.get('device', '')!s:8} "
            f"{i.get('state', '')!s:9} {i.get('memory_mb', 0):7} {i.get('sm_share', 0):5.2f} "
            f"{i.get('time_quota', 0):5.2f} {i.get('inflight', 0):7}"
        )
    return "\n".join(lines)


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
