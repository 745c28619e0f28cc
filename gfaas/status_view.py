"""`gfaas status` as a person reads it: one line per service instance, the figures that
say whether it is healthy. Pure formatting over the status details services report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
            # Density: each model's weights on the device and the instances holding
            # them (one copy for all where weights are shared).
            weights = agent.get("weights") or {}
            if isinstance(weights, Mapping) and weights:
                shared = "shared" if agent.get("shares_weights") else "copied"
                line += f"; weights ({shared}) " + ", ".join(
                    f"{model} {(w.get('bytes') or 0) // MB} MiB x{w.get('instances', 0)}"
                    for model, w in sorted(weights.items())
                    if isinstance(w, Mapping)
                )
        return line
    if service == "memory-broker":
        links = details.get("links") or {}
        traffic = ", ".join(
            f"{name} {(link.get('bytes') or 0) // MB} MiB at {link.get('utilisation', 0):.0%}"
            for name, link in sorted(links.items())
            if isinstance(link, Mapping)
        )
        return (
            f"{details.get('leases', 0)} leases, {(details.get('bytes_leased') or 0) // MB} MiB "
            f"leased, {details.get('spilled_now', 0)} spilled, {details.get('copies', 0)} "
            f"copies; links {traffic or '-'}"
        )
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


# -- `gfaas top`: per-function rates and latency percentiles from ingress's metrics ---------

# The ingress instruments `top` reads (shared.metrics.IngressMetrics, as Prometheus names).
INVOCATIONS = "gfaas_invocations_total"
DURATION_BUCKET = "gfaas_invocation_duration_seconds_bucket"
Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def parse_metrics(text: str) -> Samples:
    """The invocation counters and duration buckets of one Prometheus scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (INVOCATIONS, DURATION_BUCKET):
                key = (s.name, tuple(sorted(s.labels.items())))
                samples[key] = samples.get(key, 0.0) + float(s.value)
    return samples


def merge(scrapes: list[Samples]) -> Samples:
    """Several ingresses' samples summed (the same series from each adds up)."""
    total: Samples = {}
    for scrape in scrapes:
        for key, value in scrape.items():
            total[key] = total.get(key, 0.0) + value
    return total


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """`histogram_quantile` over cumulative (upper bound, count) buckets: linear within
    the bucket the rank falls in; None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bound: the best we know
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class FunctionRates:
    function: str
    rate: float  # invocations/s
    error_rate: float  # failed invocations/s
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    total: int  # invocations counted so far


def function_rates(before: Samples, after: Samples, seconds: float) -> list[FunctionRates]:
    """Per function: rates over the `seconds` between two scrapes, and percentiles of
    the durations recorded between them (the buckets' differences)."""
    seconds = max(seconds, 1e-9)
    counts: dict[str, list[float]] = {}  # function -> [delta all, delta errors, total]
    buckets: dict[str, dict[float, float]] = {}
    for key, value in after.items():
        name, labels = key
        label = dict(labels)
        function = label.get("function", "")
        delta = max(value - before.get(key, 0.0), 0.0)
        if name == INVOCATIONS:
            row = counts.setdefault(function, [0.0, 0.0, 0.0])
            row[0] += delta
            row[2] += value
            if label.get("outcome") != "ok":
                row[1] += delta
        else:
            le = float(label.get("le", "inf"))
            per = buckets.setdefault(function, {})
            per[le] = per.get(le, 0.0) + delta
    rows = []
    for function in sorted(counts):
        all_, errors, total = counts[function]
        cumulative = sorted(buckets.get(function, {}).items())

        def ms(q: float, cumulative: list[tuple[float, float]] = cumulative) -> float | None:
            value = quantile(q, cumulative)
            return None if value is None else value * 1000.0

        rows.append(
            FunctionRates(
                function=function,
                rate=all_ / seconds,
                error_rate=errors / seconds,
                p50_ms=ms(0.5),
                p90_ms=ms(0.9),
                p99_ms=ms(0.99),
                total=int(total),
            )
        )
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def top_renderable(
    rates: list[FunctionRates], rows: list[tuple[str, str, float, str]], window_s: float
) -> Any:
    """One frame of `gfaas top` (a rich renderable): the functions, then the services."""
    from rich.console import Group
    from rich.table import Table

    functions = Table(title=f"functions (last {window_s:.1f}s, from ingress metrics)")
    for column in ("function", "req/s", "err/s", "p50 ms", "p90 ms", "p99 ms", "total"):
        functions.add_column(column, justify="left" if column == "function" else "right")
    for r in rates:
        functions.add_row(
            r.function,
            f"{r.rate:.1f}",
            f"{r.error_rate:.1f}",
            _ms(r.p50_ms),
            _ms(r.p90_ms),
            _ms(r.p99_ms),
            str(r.total),
        )
    if not rates:
        functions.add_row("(no invocations yet)", "", "", "", "", "", "")
    services = Table(title="services")
    for column in ("service", "instance", "up", "status"):
        services.add_column(column, justify="right" if column == "up" else "left")
    for service, instance, uptime, text in rows:
        services.add_row(service, instance, f"{uptime:.0f}s", text)
    return Group(functions, services)
