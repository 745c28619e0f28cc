"""Deploy checks: what would fail at the first call is refused at deploy instead."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client as NATS

from gfaas import cli
from gfaas.client import Client
from shared.errors import REASON_CHARS
from shared.function import LoadContext, contract_problem
from shared.natsd import NatsServer
from shared.schema import DType, FunctionSpec, StageSpec, TensorSpec, WorkflowSpec
from shared.workflow import WorkflowError
from tests.platform import Platform, platform_at

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


# -- handlers: dry-run on a worker, in a sandbox process -----------------------------


async def test_a_function_and_a_workflow_deployed_at_once_under_one_name_are_not_both(
    platform: Platform, nc: NATS
) -> None:
    """The function's handler check takes a while; the workflow's deploy is quick.
    Before, each looked for the other kind before it, and both were deployed."""
    client = Client(nc)
    await client.deploy(INC)
    function = FunctionSpec(name="dual", handler="tests.funcs:add_one")
    workflow = chain("inc", name="dual")
    outcomes: dict[str, str] = {}

    async def deploy(spec: FunctionSpec | WorkflowSpec, kind: str) -> None:
        try:
            await client.deploy(spec)
            outcomes[kind] = "deployed"
        except ValueError as exc:
            outcomes[kind] = str(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(deploy, function, "function")
        tg.start_soon(deploy, workflow, "workflow")
    kinds = {
        "function": "dual" in [f.name for f in await client.functions()],
        "workflow": "dual" in [w.name for w in await client.workflows()],
    }
    assert list(kinds.values()).count(True) <= 1, (kinds, outcomes)
    for kind, deployed in kinds.items():
        assert (outcomes[kind] == "deployed") == deployed, (kinds, outcomes)


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (
            "tests.no_such_module:f",
            "handler 'tests.no_such_module:f' cannot be imported: "
            "ModuleNotFoundError: No module named 'tests.no_such_module'",
        ),
        (
            "tests.funcs:no_such_attr",
            "handler 'tests.funcs:no_such_attr' cannot be imported: "
            "'tests.funcs' has no attribute 'no_such_attr'",
        ),
        ("tests.funcs:NOT_A_HANDLER", "handler 'tests.funcs:NOT_A_HANDLER' is not callable"),
        (
            "tests.funcs:two_args",
            "handler 'tests.funcs:two_args' takes 2 positional arguments, a handler takes inputs",
        ),
    ],
)
async def test_a_handler_a_worker_cannot_use_is_refused_at_deploy(
    platform: Platform, nc: NATS, handler: str, reason: str
) -> None:
    spec = FunctionSpec(name="bad", handler=handler)
    with pytest.raises(ValueError, match="^" + re.escape(f"bad: {reason}")):
        await Client(nc).deploy(spec)
    assert await Client(nc).functions() == []


async def test_sound_handlers_deploy(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    assert await client.check_handler(INC)
    await client.deploy(INC)
    # A class is checked, not built: no weights are needed for that.
    await client.deploy(FunctionSpec(name="scale", handler="tests.funcs:Scale"))
    assert sorted(f.name for f in await client.functions()) == ["inc", "scale"]


async def test_what_a_handler_module_does_at_import_stays_in_the_sandbox(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the worker's import path (the worker runs in this process), not imported here.
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "gfaas_exits_at_import.py").write_text(
        'open("left-behind", "w").close()\nprint("noise")\nraise SystemExit(3)\n'
    )
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.chdir(tmp_path)
    spec = FunctionSpec(name="exits", handler="gfaas_exits_at_import:f")
    # A node whose handler packages (GFAAS_HANDLER_PACKAGES) include that module.
    with (
        platform_at(nats_server.url, tmp_path / "s", handler_packages="gfaas_exits_at_import"),
        pytest.raises(ValueError, match=r"cannot be imported: SystemExit: 3$"),
    ):
        await Client(nc).deploy(spec)
    assert "gfaas_exits_at_import" not in sys.modules
    assert not (tmp_path / "left-behind").exists()  # written in the sandbox's own directory


async def test_a_huge_multi_line_import_error_is_refused_in_one_clipped_line(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reason quoted the module's exception whole: 100 KB over many lines reached
    # the caller (and the worker's log) as it was.
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "gfaas_raises_a_page.py").write_text(
        "raise RuntimeError('first line\\n' + 'x' * 100 + ('\\n' + 'y' * 99) * 1000)\n"
    )
    monkeypatch.syspath_prepend(str(modules))
    spec = FunctionSpec(name="page", handler="gfaas_raises_a_page:f")
    with (
        platform_at(nats_server.url, tmp_path / "s", handler_packages="gfaas_raises_a_page"),
        pytest.raises(ValueError, match="cannot be imported") as caught,
    ):
        await Client(nc).deploy(spec)
    reason = str(caught.value)
    assert "\n" not in reason, reason[:1000]
    assert len(reason) < REASON_CHARS + 200, len(reason)
    assert "cannot be imported: RuntimeError: first line x" in reason, reason
    assert reason.endswith("characters cut)"), reason


async def test_a_process_a_handler_module_starts_at_import_goes_with_the_sandbox(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module that starts a process at import (which inherits the sandbox's output):
    the check answers when the import is done, not at its timeout, and the process
    does not outlive it. Before, the deploy was refused after 20 s as 'did not
    import' and the process ran on, its parent gone."""
    modules = tmp_path / "mods"
    modules.mkdir()
    pid_file = tmp_path / "child.pid"
    (modules / "gfaas_spawns_at_import.py").write_text(
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "def f(inputs):\n    return inputs\n"
    )
    monkeypatch.syspath_prepend(str(modules))
    spec = FunctionSpec(name="spawns", handler="gfaas_spawns_at_import:f")
    with platform_at(nats_server.url, tmp_path / "s", handler_packages="gfaas_spawns_at_import"):
        started = time.monotonic()
        await Client(nc).deploy(spec)  # sound: deployed
        assert time.monotonic() - started < 10.0
    pid = int(pid_file.read_text())
    with anyio.fail_after(5):
        while alive(pid):
            await anyio.sleep(0.05)


def alive(pid: int) -> bool:
    """Is `pid` a process that still runs (a zombie nobody reaped has ended)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def test_a_handler_whose_file_changed_is_checked_again(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker remembers sound handlers by their module's file as it was then.
    module = tmp_path / "gfaas_edited_handler.py"
    module.write_text("def f(inputs):\n    return inputs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = FunctionSpec(name="edited", handler="gfaas_edited_handler:f")
    with platform_at(nats_server.url, tmp_path / "s", handler_packages="gfaas_edited_handler"):
        await Client(nc).deploy(spec)
        await Client(nc).deploy(spec)  # unchanged: as sound as it was
        module.write_text("def f(inputs, scale):\n    return inputs\n")
        with pytest.raises(ValueError, match="takes 2 positional arguments"):
            await Client(nc).deploy(spec)


def test_gfaas_deploy_refuses_an_unusable_handler_in_one_line(
    platform: Platform, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nhandler = "tests.funcs:two_args"\n')
    assert cli.main(["deploy", str(path), "--nats-url", platform.url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gfaas: bad: handler 'tests.funcs:two_args' takes 2 positional arguments, "
        "a handler takes inputs"
    ]


def test_without_workers_a_deploy_goes_on_unchecked(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "early.toml"
    path.write_text('name = "early"\nhandler = "tests.no_such_module:f"\n')
    with platform_at(nats_server.url, tmp_path / "state", workers=0):
        assert cli.main(["deploy", str(path), "--nats-url", nats_server.url]) == 0
    err = capsys.readouterr().err
    assert "no worker checked early's handler tests.no_such_module:f; it is unchecked" in err


async def test_without_workers_the_client_deploys_unchecked(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "state", workers=0):
        spec = FunctionSpec(name="early", handler="tests.no_such_module:f")
        assert not await Client(nc).check_handler(spec)
        await Client(nc).deploy(spec)
        assert [f.name for f in await Client(nc).functions()] == ["early"]


class NoCtx:
    def __init__(self) -> None: ...

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs


class NotCallable:
    def __init__(self, ctx: LoadContext) -> None: ...


class CallsWithTwo:
    def __init__(self, ctx: LoadContext, extra: int = 0) -> None: ...

    def __call__(self, inputs: dict[str, Any], scale: float) -> dict[str, Any]:
        return inputs


class Sound(CallsWithTwo):
    def __call__(self, inputs: dict[str, Any], scale: float = 1.0) -> dict[str, Any]:
        return inputs


def needs_a_keyword(inputs: dict[str, Any], *, scale: float) -> dict[str, Any]:
    return inputs


@pytest.mark.unit
@pytest.mark.parametrize(
    ("target", "problem"),
    [
        (NoCtx, "'h': NoCtx.__init__ takes 0 positional arguments, a handler class takes ctx"),
        (NotCallable, "'h': instances of NotCallable are not callable"),
        (CallsWithTwo, "'h': CallsWithTwo.__call__ takes 2 positional arguments, a handler"),
        (needs_a_keyword, "cannot be called with one argument (missing a required"),
        (Sound, None),
        (len, None),  # a builtin: taken as it is
    ],
)
def test_the_handler_contract_is_checked_without_building(target: Any, problem: str) -> None:
    found = contract_problem("h", target)
    assert found is None if problem is None else problem in (found or ""), found
