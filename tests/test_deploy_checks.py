"""Deploy checks: what would fail at the first call is refused at deploy instead."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from shared.schema import DType, FunctionSpec, StageSpec, TensorSpec, WorkflowSpec
from shared.workflow import WorkflowError
from tests.platform import Platform

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


def tensor(name: str, dtype: DType, shape: list[int]) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


INC = FunctionSpec(
    name="inc",
    handler="tests.funcs:add_one",
    inputs=[tensor("x", DType.FLOAT32, [-1, 3])],
    outputs=[tensor("y", DType.FLOAT32, [-1, 3])],
)
AS_INT = FunctionSpec(
    name="as-int",
    handler="tests.funcs:echo",
    inputs=[tensor("x", DType.INT64, [-1])],
    outputs=[tensor("y", DType.INT64, [-1])],
)


def chain(second: str, *, name: str = "chain") -> WorkflowSpec:
    return WorkflowSpec(
        name=name,
        inputs=[tensor("x", DType.FLOAT32, [-1, 3])],
        stages=[
            StageSpec(name="a", function="inc", inputs={"x": "$in.x"}),
            StageSpec(name="b", function=second, inputs={"x": "a.y"}),
        ],
        outputs={"z": "b.y"},
    )


async def test_a_workflow_whose_stage_is_not_deployed_is_refused(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await client.deploy(INC)
    with pytest.raises(WorkflowError, match="function 'missing' is not deployed"):
        await client.deploy(chain("missing"))
    assert await client.workflows() == []


async def test_a_workflow_passing_the_wrong_dtype_between_stages_is_refused(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await client.deploy(INC)
    await client.deploy(AS_INT)
    with pytest.raises(WorkflowError, match=r"input 'x' wants int64.*a\.y is float32"):
        await client.deploy(chain("as-int"))
    await client.deploy(chain("inc"))  # matching stages deploy
    assert [w.name for w in await client.workflows()] == ["chain"]


async def test_a_function_whose_model_was_never_pushed_is_refused(
    platform: Platform, nc: NATS
) -> None:
    spec = FunctionSpec(name="scaled", handler="tests.funcs:Scale", model="never-pushed")
    with pytest.raises(ValueError, match="model 'never-pushed' is not in the model store"):
        await Client(nc).deploy(spec)
    assert await Client(nc).functions() == []


async def test_removing_a_function_a_workflow_uses_needs_force(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await client.deploy(INC)
    await client.deploy(chain("inc"))
    with pytest.raises(ValueError, match="used by workflow\\(s\\) chain"):
        await client.remove("inc")
    assert [f.name for f in await client.functions()] == ["inc"]
    assert await client.remove("chain")
    assert await client.remove("inc")  # nothing uses it any more
    await client.deploy(INC)
    await client.deploy(chain("inc"))
    assert await client.remove("inc", force=True)
