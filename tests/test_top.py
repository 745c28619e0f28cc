"""`gfaas top`: per-function rates and percentiles from ingress's Prometheus endpoint
(two scrapes differenced), with the services' status lines."""

from __future__ import annotations

import re

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas import cli, status_view
from gfaas.client import Client
from tests.helpers import deploy_and_wait
from tests.platform import Platform
from tests.specs import ECHO

SCRAPE = """\
# TYPE gfaas_invocations_total counter
gfaas_invocations_total{{function="echo",tenant="default",outcome="ok"}} {ok}
gfaas_invocations_total{{function="echo",tenant="default",outcome="handler_error"}} {err}
# TYPE gfaas_invocation_duration_seconds histogram
gfaas_invocation_duration_seconds_bucket{{function="echo",outcome="ok",le="0.001"}} {b1}
gfaas_invocation_duration_seconds_bucket{{function="echo",outcome="ok",le="0.01"}} {b2}
gfaas_invocation_duration_seconds_bucket{{function="echo",outcome="ok",le="+Inf"}} {b3}
gfaas_invocation_duration_seconds_count{{function="echo",tenant="default",outcome="ok"}} {b3}
gfaas_invocation_duration_seconds_sum{{function="echo",tenant="default",outcome="ok"}} 1.0
"""


def test_rates_and_percentiles_come_from_the_difference_of_two_scrapes() -> None:
    before = status_view.parse_metrics(SCRAPE.format(ok=10, err=0, b1=10, b2=10, b3=10))
    after = status_view.parse_metrics(SCRAPE.format(ok=110, err=20, b1=60, b2=110, b3=110))
    (echo,) = status_view.function_rates(before, after, 2.0)
    assert echo.function == "echo"
    assert echo.rate == pytest.approx(60.0)  # 120 more in 2 s
    assert echo.error_rate == pytest.approx(10.0)
    assert echo.total == 130
    # Of the 100 new durations, 50 under 1 ms and 50 between 1 and 10 ms.
    assert echo.p50_ms == pytest.approx(1.0)
    assert echo.p90_ms == pytest.approx(1.0 + 9.0 * 0.8)
    assert echo.p99_ms is not None
    assert echo.p99_ms <= 10.0


def test_quantile_is_histogram_quantile() -> None:
    assert status_view.quantile(0.5, []) is None
    assert status_view.quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    assert status_view.quantile(0.5, [(1.0, 2.0), (2.0, 4.0)]) == pytest.approx(1.0)
    # Past the last finite bound the best known is that bound.
    assert status_view.quantile(0.99, [(1.0, 1.0), (float("inf"), 4.0)]) == 1.0


@pytest.mark.nats
@pytest.mark.anyio
async def test_top_once_shows_rates_latencies_and_services(
    platform: Platform,
    nc: NATS,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    await deploy_and_wait(nc, ECHO)
    client = Client(nc)
    for _ in range(5):
        await client.invoke("echo", {"x": np.ones(3, np.float32)})
    capsys.readouterr()
    codes: list[int] = []

    def top() -> None:
        codes.append(cli.main(["top", "--once", "--interval", "1.0", "--nats-url", platform.url]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, top)
        with anyio.move_on_after(1.5):
            while not codes:  # load during the window between the two scrapes
                await client.invoke("echo", {"x": np.ones(3, np.float32)})
    out = capsys.readouterr().out
    assert codes == [0], out
    (row,) = [line for line in out.splitlines() if re.match(r"│ echo\s", line)]
    cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
    function, rate, errors, p50, p90, p99, total = cells
    assert function == "echo"
    assert float(rate) > 0
    assert float(errors) == 0
    assert 0 < float(p50) <= float(p90) <= float(p99)
    assert int(total) > 5
    for service in ("ingress", "scheduler", "memory-broker", "gpu-worker"):
        assert re.search(rf"│ {service}\s", out), out
