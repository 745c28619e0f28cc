"""`gfaas invoke` against a live platform: what it prints for what the function returns."""

from __future__ import annotations

from pathlib import Path

import anyio
import nats
import numpy as np
import pytest

from gfaas import cli
from gfaas.client import Client
from shared.schema import DType, FunctionSpec, StageSpec, TensorSpec, WorkflowSpec
from tests.helpers import deploy_and_wait
from tests.platform import Platform

BIG = FunctionSpec(name="big", handler="tests.funcs:big_output")  # 4 MiB of zeros
# The bus limit is 1 MiB: this input goes into the pool, by handle.
LARGE = np.arange(400_000, dtype=np.float32)


async def _deploy(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await deploy_and_wait(nc, BIG, FunctionSpec(name="echo", handler="tests.funcs:echo"))
    finally:
        await nc.drain()


async def _no_leases_left(url: str) -> None:
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(10):
            while (await Client(nc).status("memory-broker")).details["leases"]:
                await anyio.sleep(0.05)
    finally:
        await nc.drain()


@pytest.mark.nats
def test_gfaas_invoke_prints_outputs_over_the_bus_limit_and_releases_them(
    platform: Platform, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `gfaas invoke` sent an input over the bus limit by handle but asked for its
    # outputs by value: a function returning more than 1 MiB failed with
    # `payload_too_large: reply of ... bytes exceeds the 1032192-byte limit; large
    # outputs move by handle`, which the command gave the user no way to ask for.
    anyio.run(_deploy, platform.url)
    capsys.readouterr()
    assert cli.main(["invoke", "big", "-i", "x=[1]", "--nats-url", platform.url]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("y uint8[4194304]: [0 0 0 ... 0 0 0]"), captured
    big = tmp_path / "large.npy"
    np.save(big, LARGE)
    assert cli.main(["invoke", "echo", "-i", f"x=@{big}", "--nats-url", platform.url]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("y float32[400000]: [0.00000e+00 1.00000e+00"), captured
    # The command let go of the outputs it read.
    anyio.run(_no_leases_left, platform.url)


X = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1])]
Y = [TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1])]
INC = FunctionSpec(name="inc", handler="tests.funcs:add_one", inputs=X, outputs=Y)
TWICE = WorkflowSpec(
    name="twice",
    inputs=X,
    stages=[
        StageSpec(name="a", function="inc", inputs={"x": "$in.x"}),
        StageSpec(name="b", function="inc", inputs={"x": "a.y"}),
    ],
    outputs={"z": "b.y"},
)


async def _deploy_workflow(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await deploy_and_wait(nc, INC)
        await Client(nc).deploy(TWICE)
    finally:
        await nc.drain()


@pytest.mark.nats
def test_invoke_and_profile_of_an_unknown_function_exit_alike(
    platform: Platform, capsys: pytest.CaptureFixture[str]
) -> None:
    # `gfaas profile nothing` exited 1 and `gfaas invoke nothing` 2, though both say
    # the same error the platform answered (gfaas.cli EXIT_ERROR).
    capsys.readouterr()
    said = "gfaas: unknown_function: function 'nothing' is not deployed\n"
    assert cli.main(["invoke", "nothing", "-i", "x=[1]", "--nats-url", platform.url]) == 2
    assert capsys.readouterr().err.endswith(said)
    assert cli.main(["profile", "nothing", "--nats-url", platform.url]) == 2
    assert capsys.readouterr().err == said
    assert cli.EXIT_ERROR == 2


@pytest.mark.nats
def test_gfaas_profile_of_a_workflow_says_it_is_one(
    platform: Platform, capsys: pytest.CaptureFixture[str]
) -> None:
    # `gfaas profile classify-image` said "unknown_function: function
    # 'classify-image' is not deployed", of a workflow `gfaas ls` lists.
    anyio.run(_deploy_workflow, platform.url)
    capsys.readouterr()
    assert cli.main(["profile", "twice", "--nats-url", platform.url]) == 2
    assert capsys.readouterr().err == "gfaas: twice is a workflow: profile its functions (inc)\n"
    assert cli.main(["profile", "nothing", "--nats-url", platform.url]) == 2
    said = "gfaas: unknown_function: function 'nothing' is not deployed\n"
    assert capsys.readouterr().err == said
