"""Handlers with least privilege (issue 10): with the agent as root and
GFAAS_HANDLER_USER=nobody, instance processes run as nobody, in a directory of their
own, cannot read root's files or get root back, and still map what they must (the
broker's pool slabs and board, the host tier's weights), which are open to the
handler group and to no one else."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS

from bench.live_models import mlp
from gfaas.client import Client, connect_nats, outputs_of
from services.gpu_worker import privileges
from services.gpu_worker.sandbox import HandlerChecks, import_path
from shared import auth
from shared.config import Settings
from shared.dataplane import access
from shared.dataplane.shm import SHM_DIR, create_segment, list_segments, unlink_segment
from shared.natsd import NatsServer
from shared.schema import DType, FunctionSpec, OutputMode, TensorSpec
from tests.helpers import agent_details, deploy_and_wait
from tests.platform import (
    PYTHON,
    Platform,
    auth_nats_server,
    auth_platform_at,
    free_port,
    gfaas_up,
    platform_at,
    subprocess_env,
)
from tests.test_instances import wait_instances
from tests.test_shared_weights import mapped_by

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

# With a model no other process loads: the agent puts it into the host tier as the
# instance starts (the instance, as nobody, only maps it).
WHOAMI = FunctionSpec(
    name="whoami-i", handler="tests.funcs:whoami", model="m4", min_instances=1,
    max_instances=1, memory_mb=256, idle_s=60.0, timeout_ms=60_000,
)  # fmt: skip


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this machine")


@pytest.fixture
def namespace() -> str:
    return f"gfaas-hu{secrets.token_hex(4)}"


@pytest.fixture
def node(nats_server: NatsServer, reachable: Path, namespace: str) -> Iterator[Platform]:
    nobody()
    try:
        with platform_at(
            nats_server.url,
            reachable / "state",
            agent_memory_mb=800,
            handler_user="nobody",
            shm_namespace=namespace,
        ) as p:
            yield p
    finally:
        access.share_segments(None)  # this process's later platforms share with no one


@pytest.fixture
def secured(reachable: Path, namespace: str) -> Iterator[tuple[str, Path]]:
    """A node with authentication on, its instances as nobody: its NATS URL and auth
    directory (0700, its credentials files 0600, root's)."""
    nobody()
    state_dir = reachable / "state"
    try:
        with (
            auth_nats_server(state_dir) as server,
            auth_platform_at(
                server.url,
                state_dir / "services",
                state_dir / "auth",
                agent_memory_mb=600,
                handler_user="nobody",
                shm_namespace=namespace,
            ) as p,
        ):
            yield p.url, state_dir / "auth"
    finally:
        access.share_segments(None)


def text(x: np.ndarray[Any, Any]) -> str:
    return bytes(x.astype(np.uint8).tolist()).decode()


def path_input(path: Path | str) -> dict[str, np.ndarray[Any, Any]]:
    return {"path": np.frombuffer(str(path).encode(), dtype=np.uint8).copy()}


def proc_status(pid: int) -> dict[str, str]:
    rows = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (row.partition(":") for row in rows)}


@pytest.mark.nats
@pytest.mark.anyio
@pytest.mark.slow  # 8-12 s: the default run stays under 10 minutes
async def test_an_instance_runs_as_nobody_in_its_own_directory_and_cannot_read_roots_files(
    node: Platform, nc: NATS, reachable: Path
) -> None:
    user = nobody()
    client = Client(nc)
    # A root-only file where nobody could reach it (so only its mode stops the read),
    # one in a root-only directory (as the auth directory's credentials are), and a
    # world-readable one beside them.
    secret = reachable / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    private = reachable / "auth"
    private.mkdir(mode=0o700)
    (private / "admin.json").write_text('{"user": "admin"}')
    (private / "admin.json").chmod(0o600)
    public = reachable / "public"
    public.write_text("anyone")
    public.chmod(0o644)

    weights = reachable / "m4.pt"
    torch.save(mlp(4).state_dict(), weights)
    await client.push_model("m4", weights)
    await deploy_and_wait(nc, WHOAMI)
    (instance,) = await wait_instances(nc, "whoami-i", 1)
    out = await client.invoke("whoami-i", path_input(secret), timeout=60)
    # Another user, and no way back: real, effective and saved ids are nobody's.
    assert out["ids"].tolist() == [user.pw_uid, user.pw_uid, user.pw_gid]
    assert text(out["read"]) == "PermissionError"
    assert text(out["setuid"]) == "PermissionError"
    status = proc_status(instance.pid)
    assert status["Uid"].split() == [str(user.pw_uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(user.pw_gid)] * 4, status["Gid"]
    assert status["Groups"] == ""
    assert status["NoNewPrivs"] == "1"
    # Not dumpable: another process of nobody's (another instance's handler) cannot
    # read its memory or environment.
    cat = shutil.which("cat") or "/bin/cat"
    peek = await anyio.run_process(
        [cat, f"/proc/{instance.pid}/environ"],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        check=False,
    )
    assert peek.returncode != 0
    assert b"Permission denied" in peek.stderr
    # Its own directory, nobody's and 0700: its working directory and HOME.
    workdir = reachable / "state" / "instances" / "w0" / instance.instance_id
    assert text(out["cwd"]) == str(workdir)
    assert text(out["home"]) == str(workdir)
    info = workdir.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (user.pw_uid, 0o700)
    # The weights its agent put into the host tier it maps read-only.
    assert any("-model-m4-" in path for path in mapped_by(instance.pid))

    reads: list[tuple[Path | str, str]] = [
        (private / "admin.json", "PermissionError"),
        ("/root/.profile", "PermissionError"),
        (public, "anyone"),
    ]
    for path, read in reads:
        out = await client.invoke("whoami-i", path_input(path), timeout=30)
        assert text(out["read"]) == read, path

    # The agent says who its instances run as; the instance says so itself.
    agent = await agent_details(client)
    assert agent["handler_user"] == {"name": "nobody", "uid": user.pw_uid, "gid": user.pw_gid}
    (row,) = [i for i in agent["instances"] if i["instance_id"] == instance.instance_id]
    assert row["uid"] == user.pw_uid
    uids = {
        s.details.get("worker_id"): s.details.get("uid")
        for s in await client.status_all("gpu-worker", timeout=1.0)
    }
    assert uids[instance.instance_id] == user.pw_uid
    assert uids["w0"] == 0

    # Removed, the instance stops and its directory goes with it.
    assert await client.remove("whoami-i", force=True)
    assert await wait_instances(nc, "whoami-i", 0, timeout=30) == []
    with anyio.fail_after(10):
        while workdir.exists():
            await anyio.sleep(0.1)


# No instance keys: on a node that isolates handler code it runs as instances anyway.
PLAIN = FunctionSpec(
    name="plain-nr", handler="tests.funcs:not_as_root", memory_mb=256, timeout_ms=60_000,
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1])],
)  # fmt: skip


@pytest.mark.nats
@pytest.mark.anyio
@pytest.mark.slow  # 8-12 s: the default run stays under 10 minutes
async def test_on_an_isolated_node_no_handler_code_runs_as_root_not_even_without_instances(
    node: Platform, nc: NATS
) -> None:
    """A function whose spec asks for no instances, which other nodes run inside the
    worker (as root here), runs in an instance as nobody: the worker takes no runs.
    Its profile is measured in an instance process too (the handler refuses root)."""
    user = nobody()
    client = Client(nc)
    await deploy_and_wait(nc, PLAIN)
    out = await client.invoke("plain-nr", {"x": np.arange(3, dtype=np.float32)}, timeout=60)
    assert out["y"].tolist() == [0.0, 2.0, 4.0]
    assert out["uid"].tolist() == [user.pw_uid]
    (instance,) = await wait_instances(nc, "plain-nr", 1)
    assert proc_status(instance.pid)["Uid"].split() == [str(user.pw_uid)] * 4
    # It asked for no time share: its runs do not wait on the agent's arbiter.
    assert instance.gated is False
    agent = await agent_details(client)
    assert agent["isolated"] is True
    # The profile (the scheduler asks for one after the deploy; this asks again): the
    # handler's runs, which raise as root, measured as nobody in a process of its own.
    profile = await client.profile("plain-nr", timeout=120)
    assert profile.agent == "w0"
    assert profile.rows
    assert all(r.throughput > 0 for r in profile.rows)


# Two instances side by side on the 2-core device: half its time each.
TWO_WHOAMI = FunctionSpec(
    name="whoami-2", handler="tests.funcs:whoami", min_instances=2, max_instances=2,
    time_quota=0.5, memory_mb=256, idle_s=60.0, timeout_ms=60_000,
)  # fmt: skip
UIDS = range(61000, 61010)


@pytest.mark.slow
@pytest.mark.nats
@pytest.mark.anyio
async def test_with_a_uid_range_each_instance_has_its_own_uid_and_cannot_signal_another(
    nats_server: NatsServer, reachable: Path, namespace: str
) -> None:
    """GFAAS_HANDLER_UIDS: one uid each from the range, all in the handler group (the
    node's segments are the group's), so one handler cannot signal another's process,
    as it could with one uid for all."""
    group = nobody().pw_gid
    try:
        with platform_at(
            nats_server.url,
            reachable / "state",
            agent_memory_mb=800,
            handler_user="nobody",
            handler_uids=f"{UIDS.start}-{UIDS.stop - 1}",
            shm_namespace=namespace,
        ) as p:
            nc = await connect_nats(p.url)
            try:
                await deploy_and_wait(nc, TWO_WHOAMI)
                with anyio.fail_after(60):
                    while True:  # switched, and serving
                        first, second = await wait_instances(nc, "whoami-2", 2)
                        if first.state == second.state == "ready":
                            break
                        await anyio.sleep(0.1)
                uids = set()
                for instance in (first, second):
                    ids = proc_status(instance.pid)["Uid"].split()
                    assert len(set(ids)) == 1, ids
                    assert proc_status(instance.pid)["Gid"].split() == [str(group)] * 4
                    uids.add(int(ids[0]))
                assert len(uids) == 2
                assert uids <= set(UIDS)
                # As the first's uid, the second's process cannot be signalled.
                kill = shutil.which("kill") or "/bin/kill"
                tried = await anyio.run_process(
                    [kill, "-0", str(second.pid)],
                    user=int(proc_status(first.pid)["Uid"].split()[0]),
                    group=group,
                    extra_groups=[],
                    check=False,
                )
                assert tried.returncode != 0, tried
                # They serve (as one of those uids), and say which is theirs.
                client = Client(nc)
                out = await client.invoke("whoami-2", path_input("/"), timeout=30)
                assert out["ids"].tolist()[0] in uids
                said = {
                    s.details.get("worker_id"): s.details.get("uid")
                    for s in await client.status_all("gpu-worker", timeout=1.0)
                }
                assert {said[first.instance_id], said[second.instance_id]} == uids
            finally:
                await nc.drain()
    finally:
        access.share_segments(None)


def test_a_uid_range_that_cannot_be_used_is_named() -> None:
    assert privileges.uid_range("") is None
    assert privileges.uid_range("100-101") == range(100, 102)
    for bad in ("7", "9-3", "x-y", "0-10", f"{os.geteuid()}-{os.geteuid() + 1}", "1-70000"):
        with pytest.raises(access.HandlerUserError, match="GFAAS_HANDLER_UIDS"):
            privileges.uid_range(bad)


@pytest.mark.slow  # 7-14 s of instance processes: the default run stays under 10 minutes
@pytest.mark.nats
@pytest.mark.anyio
async def test_a_model_instance_as_nobody_maps_the_pools_and_roots_host_tier_copy(
    node: Platform, nc: NATS, reachable: Path, namespace: str
) -> None:
    user = nobody()
    client = Client(nc)
    weights = reachable / "m8.pt"
    model = mlp(8)
    torch.save(model.state_dict(), weights)
    await client.push_model("m8", weights)
    own = FunctionSpec(
        name="mlp-nobody", handler="bench.live_models:Mlp", model="m8", min_instances=1,
        max_instances=1, memory_mb=256, idle_s=60.0, timeout_ms=60_000,
    )  # fmt: skip
    await deploy_and_wait(nc, own)
    x = np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    (instance,) = await wait_instances(nc, "mlp-nobody", 1, timeout=60, ready=True)
    # The agent (root) put the model into the host tier as the instance started: the
    # segment is root's, readable by the handler group, by no one else, so no handler
    # of nobody's can write into weights other instances map.
    (segment,) = [n for n in list_segments() if n.startswith(f"{namespace}-model-m8-")]
    info = (SHM_DIR / segment).stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, user.pw_gid, 0o640)
    # The input in a pool slab (read there), the output leased in one (written there).
    arg = await client.put("x", x)
    reply = await client.invoke_reply("mlp-nobody", [arg], outputs_by=OutputMode.HANDLE)
    assert reply.error is None, reply.error
    assert reply.worker == instance.instance_id
    (out,) = reply.outputs
    assert out.handle is not None
    np.testing.assert_allclose(outputs_of(reply)["y"], expected, rtol=1e-5, atol=1e-6)
    await client.release([arg, *reply.outputs])
    assert proc_status(instance.pid)["Uid"].split()[0] == str(user.pw_uid)
    # It maps root's copy of the weights read-only, and the pool's slab.
    assert str(SHM_DIR / segment) in mapped_by(instance.pid)
    maps = Path(f"/proc/{instance.pid}/maps").read_text()
    slab = arg.handle.segment if arg.handle is not None else ""
    assert slab
    assert f"/dev/shm/{slab}" in maps
    slab_info = (SHM_DIR / slab).stat()
    assert (slab_info.st_gid, stat.S_IMODE(slab_info.st_mode)) == (user.pw_gid, 0o660)
    board = SHM_DIR / f"{namespace}-board-local"
    board_info = board.stat()
    assert (board_info.st_gid, stat.S_IMODE(board_info.st_mode)) == (user.pw_gid, 0o640)


@pytest.mark.nats
@pytest.mark.anyio
async def test_an_instance_fetches_model_files_into_its_own_directory_not_the_nodes_cache(
    node: Platform, nc: NATS, reachable: Path
) -> None:
    client = Client(nc)
    factor = reachable / "factor.pt"
    torch.save({"factor": torch.tensor(3.0)}, factor)
    await client.push_model("factor", factor)
    # Scale asks for the pushed file itself (LoadContext.weights_file).
    spec = FunctionSpec(
        name="scale-nobody", handler="tests.funcs:Scale", model="factor", min_instances=1,
        max_instances=1, memory_mb=128, idle_s=60.0, timeout_ms=60_000,
    )  # fmt: skip
    await deploy_and_wait(nc, spec)
    x = np.arange(4, dtype=np.float32)
    out = await client.invoke("scale-nobody", {"x": x}, timeout=60)
    np.testing.assert_array_equal(out["y"], x * 3)
    (instance,) = await wait_instances(nc, "scale-nobody", 1)
    workdir = reachable / "state" / "instances" / "w0" / instance.instance_id
    (fetched,) = (workdir / "models").glob("factor-*.bin")
    assert fetched.stat().st_uid == nobody().pw_uid
    # The node's cache, which the worker's root loads from, got nothing from it.
    cache = reachable / "state" / "models"
    assert not cache.exists() or not list(cache.iterdir())


def test_segments_grant_the_handler_group_only_what_each_needs() -> None:
    user = nobody()
    handler = access.HandlerUser("nobody", user.pw_uid, user.pw_gid)
    names = [f"gfaas-hu-{os.getpid()}-{i}" for i in range(4)]
    try:
        access.share_segments(handler)
        rw = create_segment(names[0], 4096, group_access=access.GROUP_RW)
        ro = create_segment(names[1], 4096, group_access=access.GROUP_READ)
        mine = create_segment(names[2], 4096)
        access.share_segments(None)
        off = create_segment(names[3], 4096, group_access=access.GROUP_RW)
        modes = [(s.st_gid, stat.S_IMODE(s.st_mode)) for s in ((SHM_DIR / n).stat() for n in names)]
        assert modes == [(user.pw_gid, 0o660), (user.pw_gid, 0o640), (0, 0o600), (0, 0o600)]
        for seg in (rw, ro, mine, off):
            seg.close()
    finally:
        access.share_segments(None)
        for name in names:
            unlink_segment(name)


def test_a_state_directory_the_user_cannot_reach_is_named() -> None:
    user = nobody()
    handler = access.HandlerUser("nobody", user.pw_uid, user.pw_gid)
    with tempfile.TemporaryDirectory() as tmp:  # 0700, root's
        Path(tmp, "state").mkdir()
        blocked = access.unreachable(Path(tmp) / "state", handler)
        assert blocked is not None
        assert blocked.startswith(f"{tmp} is drwx------ 0:0")
        os.chmod(tmp, 0o711)
        assert access.unreachable(Path(tmp) / "state", handler) is None


def test_auto_runs_handlers_as_nobody_only_where_it_can_read_what_they_need() -> None:
    user = nobody()
    with tempfile.TemporaryDirectory() as tmp:  # 0700, root's
        libs = Path(tmp, "site-packages")
        libs.mkdir(mode=0o755)
        assert access.resolve("auto", needs=[libs]) is None
        reason = access.auto_off()
        assert reason is not None
        assert reason.startswith(f"nobody cannot read {libs}: {tmp} is drwx------ 0:0")
        os.chmod(tmp, 0o755)
        handler = access.resolve("auto", needs=[libs, Path(tmp, "state-not-made-yet")])
        assert handler == access.HandlerUser("nobody", user.pw_uid, user.pw_gid)
        assert access.auto_off() is None
        # Passable but not listable: the importer could not find modules there.
        os.chmod(libs, 0o711)
        assert access.resolve("auto", needs=[libs]) is None
    # The default is auto; what an instance reads includes the interpreter's own
    # libraries and the handler packages.
    settings = Settings()
    assert settings.handler_user == "auto"
    needs = access.instance_reads(settings)
    assert Path(torch.__file__).parent.parent in needs or any(
        Path(torch.__file__).is_relative_to(p) for p in needs
    )
    assert any(Path(__file__).parent == p for p in needs)  # the tests package


def test_a_handler_user_that_does_not_exist_stops_the_worker_with_its_name(
    reachable: Path,
) -> None:
    with pytest.raises(access.HandlerUserError, match=r"'gfaas-no-such-user'.*no such user"):
        privileges.prepare(Settings(handler_user="gfaas-no-such-user", state_dir=reachable))
    # As its own process: one clear line and an exit, before it connects anywhere.
    env = subprocess_env(
        GFAAS_HANDLER_USER="gfaas-no-such-user",
        GFAAS_STATE_DIR=str(reachable),
        GFAAS_NATS_URL="nats://127.0.0.1:9",
    )
    done = subprocess.run(
        [PYTHON, "-m", "services.gpu_worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "HandlerUserError" in done.stderr
    assert "GFAAS_HANDLER_USER='gfaas-no-such-user'" in done.stderr
    assert "no such user" in done.stderr
    assert "cannot reach NATS" not in done.stderr


def test_root_as_the_handler_user_is_refused() -> None:
    with pytest.raises(access.HandlerUserError, match="is root"):
        access.resolve("root")
    assert access.resolve("none") is None
    assert access.resolve("") is None
    # A process without the worker's settings (the broker) reads its environment.
    user = nobody()
    assert access.from_environ({"GFAAS_HANDLER_USER": "nobody"}) == access.HandlerUser(
        "nobody", user.pw_uid, user.pw_gid
    )
    with pytest.raises(access.HandlerUserError, match="no such group"):
        access.from_environ({"GFAAS_HANDLER_USER": "nobody", "GFAAS_HANDLER_GROUP": "gfaas-nog"})


PLAIN_WHOAMI = FunctionSpec(
    name="whoami-a", handler="tests.funcs:whoami", min_instances=1, max_instances=1,
    memory_mb=256, idle_s=60.0,
)  # fmt: skip


@pytest.mark.slow  # 7-14 s of instance processes: the default run stays under 10 minutes
@pytest.mark.nats
@pytest.mark.anyio
async def test_with_authentication_an_instance_connects_as_an_instance_but_cannot_read_its_file(
    secured: tuple[str, Path],
) -> None:
    url, auth_dir = secured
    creds = auth_dir / f"{auth.INSTANCE}.json"
    nc = await connect_nats(url, creds=auth_dir / "admin.json")
    try:
        client = Client(nc)
        await deploy_and_wait(nc, PLAIN_WHOAMI, timeout=30)
        (instance,) = await wait_instances(nc, "whoami-a", 1)
        # It answers: it connected with the instances' identity, read while it was root.
        out = await client.invoke("whoami-a", path_input(creds), timeout=60)
        assert out["ids"].tolist()[0] == nobody().pw_uid
        assert text(out["read"]) == "PermissionError"
        assert proc_status(instance.pid)["Uid"].split()[0] == str(nobody().pw_uid)
        # The file stayed as it was: root's, 0600, in root's 0700 directory.
        info = creds.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
        assert stat.S_IMODE(auth_dir.stat().st_mode) == 0o700
        # Nor is the password in its environment (which another nobody process could
        # not read anyway: a process that switched users is not dumpable).
        environ = Path(f"/proc/{instance.pid}/environ").read_bytes()
        password = auth.Credentials.load(creds).password
        assert password.encode() not in environ
    finally:
        await nc.drain()


ECHO_UP = FunctionSpec(
    name="echo-up", handler="tests.funcs:echo", min_instances=1, max_instances=1,
    memory_mb=256, idle_s=60.0,
)  # fmt: skip


@pytest.mark.nats
@pytest.mark.slow
def test_gfaas_up_as_root_runs_instances_as_nobody_on_the_brokers_shared_slabs(
    reachable: Path, namespace: str
) -> None:
    """Every service its own process, authentication on: the broker opens its slabs
    to the handler group from its environment, as the worker does from its settings."""
    nobody()
    state = reachable / "state"
    env = subprocess_env(
        GFAAS_HEARTBEAT_S="0.2",
        GFAAS_STATE_DIR=str(state),
        GFAAS_GRPC_PORT="0",
        GFAAS_METRICS_PORT="0",
        OTEL_EXPORTER_OTLP_ENDPOINT="",
        GFAAS_NATS_AUTH="true",
        GFAAS_HANDLER_USER="nobody",
        GFAAS_SHM_NAMESPACE=namespace,
    )
    with gfaas_up(env, "--state-dir", str(state), "--http-port", str(free_port())) as up:
        anyio.run(_echo_by_handle_as_nobody, up.url, state)


async def _echo_by_handle_as_nobody(url: str, state: Path) -> None:
    user = nobody()
    nc = await connect_nats(url, creds=state / "auth" / "admin.json")
    try:
        client = Client(nc)
        await deploy_and_wait(nc, ECHO_UP, timeout=30)
        with anyio.fail_after(60):
            while True:
                agent = await agent_details(client)
                ready = [i for i in agent["instances"] if i["state"] == "ready"]
                if ready:
                    break
                await anyio.sleep(0.2)
        (instance,) = ready
        assert instance["uid"] == user.pw_uid
        x = np.arange(1024, dtype=np.float32)
        arg = await client.put("x", x)
        reply = await client.invoke_reply("echo-up", [arg], outputs_by=OutputMode.HANDLE)
        assert reply.error is None, reply.error
        assert reply.worker == instance["instance_id"]
        np.testing.assert_array_equal(outputs_of(reply)["y"], x)
        assert arg.handle is not None
        slab = SHM_DIR / arg.handle.segment
        info = slab.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, user.pw_gid, 0o660)
        assert str(slab) in Path(f"/proc/{instance['pid']}/maps").read_text()
        assert proc_status(instance["pid"])["Uid"].split() == [str(user.pw_uid)] * 4
        await client.release([arg, *reply.outputs])
    finally:
        await nc.drain()


PROBE = FunctionSpec(name="probe", handler="tests.sandbox_probe:f")


@pytest.mark.nats
@pytest.mark.anyio
@pytest.mark.parametrize("handler_user", ["nobody", "none"])
async def test_the_deploy_sandbox_imports_a_handler_as_the_handler_user_without_secrets(
    nats_server: NatsServer,
    nc: NATS,
    reachable: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    handler_user: str,
) -> None:
    """The deploy's dry run imports the module as the node's handler user, in a 0700
    directory of its own, with no groups and none of the worker's secrets in its
    environment; with the handler user off, as the worker's user (still without them)."""
    user = nobody()
    # What a worker's environment may hold that only it may read.
    monkeypatch.setenv("GFAAS_NATS_CREDS", str(reachable / "gpu-worker.json"))
    monkeypatch.setenv("GFAAS_NATS_PASSWORD", "hunter2")
    monkeypatch.setenv("GFAAS_TEST_TOKEN", "t0k3n")
    try:
        with (
            platform_at(
                nats_server.url,
                reachable / "state",
                handler_user=handler_user,
                shm_namespace=namespace,
            ),
            pytest.raises(ValueError, match="cannot be imported: RuntimeError: ") as refused,
        ):
            await Client(nc).deploy(PROBE)
    finally:
        access.share_segments(None)
    said = str(refused.value).partition("RuntimeError: ")[2]
    words = said.split()
    cwd = words[words.index("cwd") + 3]
    assert Path(cwd).parent == Path(tempfile.gettempdir())
    assert Path(cwd).name.startswith("gfaas-check-")
    assert not Path(cwd).exists()  # removed after the dry run
    if handler_user == "nobody":
        uid, gid = user.pw_uid, user.pw_gid
        assert said == (
            f"ids {uid} {uid} {gid} groups [] cwd {uid} 700 {cwd} home {cwd} secrets []"
        )
    else:
        groups = os.getgroups()
        home = os.environ["HOME"]
        assert said == f"ids 0 0 0 groups {groups} cwd 0 700 {cwd} home {home} secrets []"
    assert await Client(nc).functions() == []


@pytest.mark.anyio
async def test_a_sound_handler_passes_the_sandbox_as_nobody() -> None:
    """What a handler imports that an instance has imported before it (torch) is there
    for the sandbox too, though nobody cannot read the interpreter's libraries here."""
    user = nobody()
    checks = HandlerChecks(user=access.HandlerUser("nobody", user.pw_uid, user.pw_gid))
    assert await checks.dry_run("tests.funcs:whoami", import_path()) is None
    refusal = await checks.dry_run("tests.funcs:two_args", import_path())
    assert refusal is not None
    assert "takes 2 positional arguments" in refusal
