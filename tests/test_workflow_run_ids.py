"""Each workflow run is its own, though callers may reuse an invocation id: its
stages' invocation ids and the holder of its leases are the run's alone."""

from __future__ import annotations

from typing import Any, cast

import anyio
import msgspec
import pytest

from services.ingress.workflow import WorkflowRunner
from shared.ids import Holder
from shared.schema import (
    DType,
    FunctionSpec,
    InvocationMeta,
    InvokeReply,
    InvokeRequest,
    StageSpec,
    Tensor,
    TensorSpec,
    WorkflowSpec,
    is_valid_token,
    now_millis,
)
from shared.workflow import plan_workflow

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

CHAIN = WorkflowSpec(
    name="chain",
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[1])],
    stages=[
        StageSpec(name="a", function="f", inputs={"x": "$in.x"}),
        StageSpec(name="b", function="f", inputs={"x": "a.y"}),
    ],
    outputs={"y": "b.y"},
)
FUNCTIONS = {"f": FunctionSpec(name="f", handler="tests.funcs:echo")}
X = Tensor(name="x", dtype=DType.FLOAT32, shape=[1], data=b"\0\0\0\0")


class Stages:
    """The scheduler, as the runs see it: each stage answers once `runs` runs have
    their first stage out (so that they are in flight together)."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.sent: list[tuple[str, str]] = []  # (stage invocation id, holder)
        self.together = anyio.Event()

    async def schedule(self, meta: InvocationMeta, body: bytes, near: str) -> InvokeReply:
        request = msgspec.msgpack.decode(body, type=InvokeRequest)
        self.sent.append((meta.invocation_id, request.holder))
        if len(self.sent) >= self.runs:
            self.together.set()
        await self.together.wait()
        y = msgspec.structs.replace(request.inputs[0], name="y")
        return InvokeReply(invocation_id=meta.invocation_id, outputs=[y], worker="w1")


def runner(stages: Stages) -> WorkflowRunner:
    return WorkflowRunner(
        stages.schedule,
        cast(Any, None),  # no broker op: every tensor here goes by value
        lambda: FUNCTIONS,
        "ingress-t",
        max_payload=1 << 20,
    )


async def run_both(invocation_ids: tuple[str, str]) -> tuple[Stages, list[InvokeReply]]:
    stages = Stages(runs=2)
    runs = runner(stages)
    plan = plan_workflow(CHAIN)
    replies: list[InvokeReply] = []

    async def one(invocation_id: str) -> None:
        meta = InvocationMeta(
            invocation_id=invocation_id, function="chain", deadline_ms=now_millis() + 10_000
        )
        replies.append(await runs.run(plan, meta, InvokeRequest(inputs=[X])))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for invocation_id in invocation_ids:
                tg.start_soon(one, invocation_id)
    return stages, replies


@pytest.mark.parametrize(
    "invocation_ids",
    [
        ("corr-1", "corr-1"),  # a caller's id reused (a correlation id, a retry)
        ("r" * 48 + "-first", "r" * 48 + "-second"),  # alike in what the ids kept
    ],
)
async def test_concurrent_runs_under_one_id_have_stages_and_holders_of_their_own(
    invocation_ids: tuple[str, str],
) -> None:
    """Two runs in flight under one invocation id shared their stages' invocation ids
    (`<id>-s0`: the dispatcher's books, the scheduler's and the workers' could not
    tell them apart) and their lease holder (`<ingress>/wf-<id>`), so neither run's
    leases were its own; ids alike in their first 48 characters did the same. Each
    run now has its own id, and the caller's id stays in its reply."""
    stages, replies = await run_both(invocation_ids)
    assert sorted(r.invocation_id for r in replies) == sorted(invocation_ids)
    assert all(r.error is None for r in replies), replies
    ids = [stage_id for stage_id, _ in stages.sent]
    assert len(ids) == 4
    assert len(set(ids)) == 4, ids
    assert all(is_valid_token(i) and len(i) <= 64 for i in ids), ids
    holders = {holder for _, holder in stages.sent}
    assert len(holders) == 2, stages.sent
    for holder in holders:
        parsed = Holder.parse(holder)
        assert parsed.owned_by("ingress-t")  # dropped with the ingress, as before
        assert parsed.run.startswith("wf-")
    # A run's stages are sent under its holder, and their ids read as the caller's.
    for stage_id, holder in stages.sent:
        run = Holder.parse(holder).run.removeprefix("wf-")
        assert stage_id.startswith(f"{run}-s"), (stage_id, holder)
        assert stage_id.startswith(invocation_ids[0][:20])
