"""Code bundles (issue 10, "who may deploy, and what runs"): handler code the admin
pushed with `gfaas code push`, pinned by digest in a spec, run only in instances
with the bundle first on their import path; a bundle not stored as pinned is
refused at deploy, one replaced in the store at instance start, an unsafe zip
before anything of it is written."""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import stat
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas import cli
from gfaas.client import Client, outputs_of
from shared import jetstream
from shared.codebundle import (
    BundleError,
    BundleRef,
    Limits,
    extract,
    pack,
    packages_of,
    sha256_hex,
)
from shared.codestore import CodeStore
from shared.dataplane import access
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.schema import DType, ErrorCode, FunctionSpec, TensorSpec
from shared.spec import SpecError, check_function, wants_instances
from tests.helpers import agent_details, deploy_and_wait
from tests.platform import Platform, auth_nats_server, platform_at

# Not one of the node's handler packages (examples, tests, bench), and never on this
# process's import path: only an instance with the bundle can import it.
PACKAGE = "gfaas_bundle_demo"
HANDLER = f"{PACKAGE}.handler:scale"
X = np.arange(4, dtype=np.float32)


def write_package(root: Path, factor: int) -> Path:
    """A bundle's source: one package whose handler multiplies by `factor`."""
    package = root / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "handler.py").write_text(
        f"FACTOR = {factor}\n\n\ndef scale(inputs):\n    return {{'y': inputs['x'] * FACTOR}}\n"
    )
    return root


def spec_for(ref: str, **keys: Any) -> FunctionSpec:
    return FunctionSpec(name="bundled", handler=HANDLER, code=ref, timeout_ms=60_000, **keys)


def zip_of(*entries: tuple[zipfile.ZipInfo | str, bytes]) -> bytes:
    buffer = io.BytesIO()
    # A duplicate entry is what one case wants: zipfile only warns about it.
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as zf:
        warnings.simplefilter("ignore")
        for info, data in entries:
            zf.writestr(info, data)
    return buffer.getvalue()


def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def ref_of(data: bytes, name: str = "demo") -> BundleRef:
    return BundleRef(name, sha256_hex(data))


# -- packing and extracting, no server ------------------------------------------------------


@pytest.mark.unit
def test_packing_is_deterministic_and_keeps_only_source(tmp_path: Path) -> None:
    source = write_package(tmp_path / "src", 2)
    (source / PACKAGE / "__pycache__").mkdir()
    (source / PACKAGE / "__pycache__" / "handler.cpython-311.pyc").write_bytes(b"\0")
    (source / PACKAGE / "stale.pyc").write_bytes(b"\0")
    (source / ".git").mkdir()
    (source / ".git" / "HEAD").write_text("ref")
    (source / PACKAGE / "vocab.txt").write_text("a b c")
    first = pack(source)
    os.utime(source / PACKAGE / "handler.py", (1, 1))  # a timestamp is no content
    assert pack(source) == first
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert names == [f"{PACKAGE}/__init__.py", f"{PACKAGE}/handler.py", f"{PACKAGE}/vocab.txt"]
    assert packages_of(names) == (PACKAGE,)
    (source / PACKAGE / "handler.py").write_text("FACTOR = 3\n")
    assert pack(source) != first


@pytest.mark.unit
def test_packing_refuses_links_and_packages_that_shadow_gfaas_or_the_stdlib(
    tmp_path: Path,
) -> None:
    source = write_package(tmp_path / "src", 2)
    (source / PACKAGE / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="is a symlink: a bundle holds regular files only"):
        pack(source)
    (source / PACKAGE / "passwd").unlink()
    (source / "json").mkdir()
    (source / "json" / "__init__.py").write_text("")
    with pytest.raises(BundleError, match="json would shadow"):
        pack(source)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("no code")
    with pytest.raises(BundleError, match="holds no Python package"):
        pack(tmp_path / "empty")


@pytest.mark.unit
def test_a_bundle_extracts_once_readable_by_anyone_and_writable_by_its_owner_only(
    tmp_path: Path,
) -> None:
    data = pack(write_package(tmp_path / "src", 2))
    root = tmp_path / "code"
    path = extract(data, ref_of(data), root)
    assert path == root / sha256_hex(data)
    assert (path / PACKAGE / "handler.py").read_text().startswith("FACTOR = 2")
    for item in [path, *path.rglob("*")]:
        mode = stat.S_IMODE(item.stat().st_mode)
        assert mode == (0o755 if item.is_dir() else 0o644), (item, oct(mode))
    assert extract(data, ref_of(data), root) == path  # once: it is there
    assert sorted(p.name for p in root.iterdir()) == [sha256_hex(data)]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([("../evil.py", b"x = 1")], "entry '../evil.py' is not a plain relative path"),
        ([("pkg/../../evil.py", b"")], "is not a plain relative path"),
        ([("/abs/evil.py", b"")], "entry '/abs/evil.py' is not a plain relative path"),
        ([("pkg/__init__.py", b""), (symlink_entry("pkg/passwd"), b"/etc/passwd")], "symlink"),
        ([("pkg/__init__.py", b""), ("pkg/__init__.py", b"again")], "appears twice"),
        ([("pkg/big.py", b"x" * 2048)], "holds 2048 bytes, over the cap of 1024"),
        ([(f"pkg/m{i}.py", b"") for i in range(9)], "9 files, over the cap of 8"),
        ([(f"pkg/m{i}.py", b"x" * 1000) for i in range(3)], "3000 bytes uncompressed, over"),
        ([("data/notes.txt", b"")], "holds no Python package or module"),
        ([("os.py", b"")], "os would shadow"),
    ],
)
def test_an_unsafe_bundle_is_refused_before_anything_is_written(
    tmp_path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]], reason: str
) -> None:
    data = zip_of(*entries)
    root = tmp_path / "code"
    limits = Limits(max_bytes=2048, max_files=8, max_entry_bytes=1024)
    with pytest.raises(BundleError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        extract(data, ref_of(data), root, limits)
    assert not root.exists() or list(root.iterdir()) == []
    assert not (tmp_path / "evil.py").exists()


@pytest.mark.unit
def test_bytes_that_are_not_the_pinned_ones_are_refused_unextracted(tmp_path: Path) -> None:
    data = pack(write_package(tmp_path / "src", 2))
    other = pack(write_package(tmp_path / "other", 3))
    root = tmp_path / "code"
    with pytest.raises(BundleError, match="corrupt or was replaced in the code store"):
        extract(other, ref_of(data), root)
    assert not root.exists()


@pytest.mark.unit
def test_an_entry_that_fails_mid_extraction_leaves_nothing_behind(tmp_path: Path) -> None:
    data = bytearray(zip_of(("pkg/__init__.py", b""), ("pkg/mod.py", b"x = 1\n" * 100)))
    # The local header's (and central directory's) declared size, made smaller.
    index = data.index(b"pkg/mod.py")
    size_at = index - 30 + 22  # local header: uncompressed size at offset 22
    data[size_at : size_at + 4] = (10).to_bytes(4, "little")
    central = data.index(b"pkg/mod.py", index + 1)
    data[central - 46 + 24 : central - 46 + 28] = (10).to_bytes(4, "little")
    root = tmp_path / "code"
    # Read as declared (10 bytes), its CRC no longer matches: after pkg/__init__.py
    # was written.
    with pytest.raises(BundleError, match="cannot be extracted: Bad CRC-32"):
        extract(bytes(data), ref_of(bytes(data)), root)
    assert list(root.iterdir()) == []  # the partial directory went


@pytest.mark.unit
def test_a_spec_pins_a_bundle_by_name_and_digest_and_then_runs_as_instances() -> None:
    digest = "ab" * 32
    spec = spec_for(f"demo@sha256:{digest}")
    check_function(spec)
    assert wants_instances(spec)
    for bad, reason in [
        ("demo", "must be NAME@sha256:<64 lowercase hex digits>"),
        (f"demo@sha256:{digest[:-1]}", "must be NAME@sha256"),
        (f"demo@sha256:{digest.upper()}", "must be NAME@sha256"),
        (f"../x@sha256:{digest}", "code bundle name '../x' must match"),
        (f"Demo@sha256:{digest}", "code bundle name 'Demo' must match"),
    ]:
        with pytest.raises(SpecError, match=reason.replace("(", r"\(")):
            check_function(spec_for(bad))


# -- live: push, deploy, run ----------------------------------------------------------------


@pytest.fixture
def node(
    nats_server: NatsServer, reachable: Path, request: pytest.FixtureRequest
) -> Iterator[Platform]:
    """One agent; its instances as nobody when this runs as root (they read the
    extracted bundle as that user, and the node runs every function as instances),
    unless the test asks for the agent's own user (`indirect` "self": then only the
    bundle makes its function run as instances)."""
    as_nobody = getattr(request, "param", "nobody") == "nobody"
    as_nobody = as_nobody and os.geteuid() == 0 and _has_nobody()
    try:
        with platform_at(
            nats_server.url,
            reachable / "state",
            agent_memory_mb=800,
            handler_user="nobody" if as_nobody else "",
        ) as p:
            yield p
    finally:
        access.share_segments(None)  # this process's later platforms share with no one


def _has_nobody() -> bool:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return True


def push(platform: Platform, source: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`gfaas code push demo SOURCE`: the reference it printed."""
    assert cli.main(["code", "push", "demo", str(source), "--nats-url", platform.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    assert out[0].startswith("demo@sha256:"), out
    return out[0]


@pytest.mark.slow  # 7-14 s of instance processes: the default run stays under 10 minutes
@pytest.mark.nats
@pytest.mark.anyio
@pytest.mark.parametrize("node", ["nobody", "self"], indirect=True)
async def test_a_pushed_bundle_deploys_and_its_handler_runs_in_an_instance(
    node: Platform, nc: NATS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_package(tmp_path / "v1", 2)
    ref = await anyio.to_thread.run_sync(push, node, source, capsys)
    assert ref == f"demo@sha256:{sha256_hex(pack(source))}"
    # The same content again: the same reference, nothing written.
    assert await anyio.to_thread.run_sync(push, node, source, capsys) == ref
    store = await CodeStore.open(nc.jetstream())
    assert await store.versions("demo") == [ref.rpartition(":")[2]]
    # No instance key: the bundle alone makes it run as instances.
    await deploy_and_wait(nc, spec_for(ref))
    client = Client(nc)
    reply = await client.invoke_reply("bundled", {"x": X}, timeout=60)
    assert reply.error is None, reply.error
    np.testing.assert_array_equal(outputs_of(reply)["y"], X * 2)
    assert reply.worker.startswith("w0-"), reply.worker  # an instance, not the worker
    extracted = node.state_dir / "code" / ref.rpartition(":")[2]
    assert (extracted / PACKAGE / "handler.py").is_file()
    assert PACKAGE not in sys.modules  # never imported into the agent's process
    details = await agent_details(client)
    uids = {i["uid"] for i in details["instances"] if i["function"] == "bundled"}
    if details["handler_user"] is not None:  # it read the bundle as that user
        assert uids == {details["handler_user"]["uid"]}, (uids, details["handler_user"])


@pytest.mark.nats
@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.parametrize("node", ["nobody", "self"], indirect=True)
async def test_a_bundled_function_is_profiled_in_an_instance_process(
    node: Platform, nc: NATS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agent's own process never imports a bundle: its profile is measured in a
    process of its own, with the bundle mounted (as nobody where the node has it)."""
    ref = await anyio.to_thread.run_sync(push, node, write_package(tmp_path / "p", 3), capsys)
    spec = spec_for(ref, inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1])])
    await deploy_and_wait(nc, spec)
    profile = await Client(nc).profile("bundled", timeout=120)
    assert profile.agent == "w0"
    assert profile.rows
    assert all(r.throughput > 0 for r in profile.rows)
    assert PACKAGE not in sys.modules


@pytest.mark.slow
@pytest.mark.nats
@pytest.mark.anyio
async def test_a_pinned_version_is_kept_until_no_function_pins_it(
    node: Platform, nc: NATS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gfaas code ls` says who pins each version; `gfaas code rm` refuses a pinned
    one (its functions' next instance would not start), removes it once unpinned."""
    ref = await anyio.to_thread.run_sync(push, node, write_package(tmp_path / "r", 5), capsys)
    await deploy_and_wait(nc, spec_for(ref))

    def code(*args: str) -> int:
        return cli.main(["code", *args, "--nats-url", node.url])

    assert await anyio.to_thread.run_sync(code, "ls") == 0
    # (The in-process platform's logs go to stdout too.)
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("demo@")]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row.split()[0] == ref
    assert row.split()[-1] == "bundled"
    assert await anyio.to_thread.run_sync(code, "rm", ref) == 2  # refused, as every refusal
    assert "pinned by function(s) bundled" in capsys.readouterr().err
    client = Client(nc)
    assert await client.remove("bundled")
    assert await anyio.to_thread.run_sync(code, "rm", ref) == 0
    assert await anyio.to_thread.run_sync(code, "rm", ref) == 1  # gone: nothing to remove
    assert "no code bundle" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not in the code store"):
        await client.deploy(spec_for(ref))


@pytest.mark.nats
@pytest.mark.anyio
async def test_a_spec_pinning_a_digest_that_was_never_pushed_is_refused_at_deploy(
    node: Platform, nc: NATS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = await anyio.to_thread.run_sync(push, node, write_package(tmp_path / "v1", 2), capsys)
    wrong = "demo@sha256:" + "0" * 64
    with pytest.raises(ValueError, match=r"code bundle demo@sha256:000000000000… is not in the"):
        await Client(nc).deploy(spec_for(wrong))
    spec_file = tmp_path / "bundled.toml"
    spec_file.write_text(f'name = "bundled"\nhandler = "{HANDLER}"\ncode = "{wrong}"\n')
    code = await anyio.to_thread.run_sync(
        cli.main, ["deploy", str(spec_file), "--nats-url", node.url]
    )
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()
    stored = ref.rpartition(":")[2][:12]
    assert line == (
        "gfaas: bundled: code bundle demo@sha256:000000000000… is not in the code store "
        f"(versions of 'demo' there: sha256:{stored}…); push it with `gfaas code push demo DIR`"
    )
    assert await Client(nc).functions() == []


@pytest.mark.nats
@pytest.mark.anyio
async def test_an_unsafe_zip_in_the_store_is_refused_at_deploy(node: Platform, nc: NATS) -> None:
    # Written straight into the store (as only the admin can), under its true digest.
    store = await CodeStore.open(nc.jetstream())
    init: tuple[zipfile.ZipInfo | str, bytes] = (f"{PACKAGE}/__init__.py", b"")
    cases: list[tuple[list[tuple[zipfile.ZipInfo | str, bytes]], str]] = [
        ([init, ("../evil.py", b"")], "'../evil.py' is not a plain"),
        ([init, (symlink_entry(f"{PACKAGE}/x"), b"/")], "symlink"),
    ]
    for entries, reason in cases:
        data = zip_of(*entries)
        ref, _ = await store.push("demo", data)
        with pytest.raises(ValueError, match=reason):
            await Client(nc).deploy(spec_for(str(ref)))
        assert not (node.state_dir / "code" / ref.digest).exists()
    assert not (node.state_dir / "evil.py").exists()
    assert await Client(nc).functions() == []


@pytest.mark.nats
@pytest.mark.anyio
async def test_a_bundle_replaced_in_the_store_is_refused_at_instance_start(
    node: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    store = await CodeStore.open(nc.jetstream())
    ref, _ = await store.push("demo", pack(write_package(tmp_path / "v1", 2)))
    # Deployed unchecked: no node has extracted it yet.
    await deploy_and_wait(nc, spec_for(str(ref), max_instances=1), handler_check=False)
    # The admin's credentials write the object's bytes over (what a compromised
    # store, or a careless admin, would do): same name, other code.
    raw = await jetstream.code_store(nc.jetstream())
    await raw.put(str(ref), pack(write_package(tmp_path / "evil", 666)))
    with pytest.raises(GfaasError) as err:
        await client.invoke("bundled", {"x": X}, timeout=60)
    assert err.value.code is ErrorCode.HANDLER_ERROR
    assert "an instance of 'bundled' could not start: bundled: code bundle " in err.value.reason
    assert "is corrupt or was replaced in the code store" in err.value.reason
    # Nothing of it was written, and the agent's status says why it failed.
    code_dir = node.state_dir / "code"
    assert not code_dir.exists() or list(code_dir.iterdir()) == []
    failed = [i for i in (await agent_details(client))["instances"] if i["state"] == "failed"]
    assert failed, failed
    assert "corrupt or was replaced" in failed[0]["error"]["reason"], failed
    # A deploy of it now is refused at once: the store's record no longer matches.
    with pytest.raises(ValueError, match="in the code store does not match its digest"):
        await client.deploy(spec_for(str(ref)))


@pytest.mark.slow
@pytest.mark.nats
@pytest.mark.anyio
async def test_a_new_version_redeployed_serves_the_new_code_with_no_failed_call(
    node: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    store = await CodeStore.open(nc.jetstream())
    v1, _ = await store.push("demo", pack(write_package(tmp_path / "v1", 2)))
    await deploy_and_wait(nc, spec_for(str(v1), min_instances=1, max_instances=1))
    first = await client.invoke("bundled", {"x": X}, timeout=60)
    np.testing.assert_array_equal(first["y"], X * 2)
    v2, _ = await store.push("demo", pack(write_package(tmp_path / "v2", 3)))
    assert v2 != v1
    await client.deploy(spec_for(str(v2), min_instances=1, max_instances=1))
    answers: list[float] = []
    with anyio.fail_after(60):
        while not answers or answers[-1] != 3.0:
            out = await client.invoke("bundled", {"x": X}, timeout=60)  # never fails
            answers.append(float(out["y"][1]))
            await anyio.sleep(0.05)
    assert set(answers) <= {2.0, 3.0}, answers
    print(f"calls across the redeploy: {answers.count(2.0)} by v1, then v2")
    # Both versions stay in the store: a spec still pinning v1 finds it.
    assert await store.versions("demo") == sorted([v1.digest, v2.digest])


@pytest.mark.slow  # 6-9 s of instance processes
@pytest.mark.nats
@pytest.mark.anyio
async def test_an_instance_started_for_v1_serves_v1_though_v2_was_deployed_before_it_read_it(
    node: Platform, nc: NATS, tmp_path: Path
) -> None:
    """The redeploy lands between the scheduler's start command and the instance's
    first read of the spec: the instance still serves the version it was started for
    (its bundle is the one on its path), and the call that woke it is answered."""
    client = Client(nc)
    store = await CodeStore.open(nc.jetstream())
    v1, _ = await store.push("demo", pack(write_package(tmp_path / "v1", 2)))
    v2, _ = await store.push("demo", pack(write_package(tmp_path / "v2", 3)))
    await deploy_and_wait(nc, spec_for(str(v1), max_instances=2, sm_share=0.5), handler_check=False)
    results: list[float | GfaasError] = []

    async def call() -> None:
        try:
            out = await client.invoke("bundled", {"x": X}, timeout=60)
            results.append(float(out["y"][1]))
        except GfaasError as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)  # from zero: the start command names v1
        with anyio.fail_after(30):
            while not (await agent_details(client))["instances"]:
                await anyio.sleep(0.005)
        await client.deploy(spec_for(str(v2), max_instances=2, sm_share=0.5), handler_check=False)
    (result,) = results
    assert isinstance(result, float), result
    assert result in (2.0, 3.0), result
    # And v1's instance started: it did not fail for want of v2's code.
    failed = [i for i in (await agent_details(client))["instances"] if i["state"] == "failed"]
    assert not failed, failed


# -- who may write the code store -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.nats
@pytest.mark.anyio
async def test_a_workers_credentials_cannot_write_the_code_store(tmp_path: Path) -> None:
    from shared import auth

    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    with auth_nats_server(tmp_path / "state") as server:
        creds = tmp_path / "state" / "auth"
        admin, worker = NATS(), NATS()
        await admin.connect(server.url, **auth.connect_options(creds=creds / "admin.json"))
        await worker.connect(
            server.url,
            error_cb=on_error,
            **auth.connect_options(creds=creds / "gpu-worker.json"),
        )
        try:
            # Not even create the store first, with subjects of its choosing.
            made = False
            with anyio.move_on_after(3), contextlib.suppress(Exception):
                await worker.jetstream().create_object_store(jetstream.CODE_BUCKET)
                made = True
            assert not made
            store = await CodeStore.open(admin.jetstream())
            good = pack(write_package(tmp_path / "v1", 2))
            ref, _ = await store.push("demo", good)
            # Handler code holds a worker's credentials: it may read bundles, not write.
            theirs = await worker.jetstream().object_store(jetstream.CODE_BUCKET)
            with anyio.fail_after(5):  # its fetch's stream info and pull consumer: allowed
                assert await CodeStore(theirs).fetch(ref, max_bytes=len(good)) == good
            wrote = False
            with anyio.move_on_after(3), contextlib.suppress(Exception):
                await theirs.put(str(ref), b"evil")  # no ack comes: the server refused it
                wrote = True
            assert not wrote
            await worker.publish(f"$O.{jetstream.CODE_BUCKET}.C.evil", b"evil")
            await worker.flush()
            evil = f"$O.{jetstream.CODE_BUCKET}.c.evil".lower()
            # Each refusal comes as its own async error: wait for this publish's (the
            # store's refusals before it may be all that arrived so far).
            with anyio.move_on_after(5):
                while not any(evil in str(e).lower() for e in errors):
                    await anyio.sleep(0.02)
            seen = " ".join(str(e) for e in errors).lower()
            assert evil in seen, seen
            assert f"stream.create.obj_{jetstream.CODE_BUCKET}" in seen, seen
            assert (await store._store.get(str(ref))).data == good  # unchanged
            assert (await theirs.get(str(ref))).data == good  # and readable by it
        finally:
            await worker.close()
            await admin.close()


async def _record_says(nc: NATS, name: str, **fields: Any) -> None:
    """Rewrite the stored object `name`'s record (its meta message) with `fields`."""
    import base64
    import json

    from nats.js.object_store import OBJ_META_PRE_TEMPLATE

    raw = await jetstream.code_store(nc.jetstream())
    info = await raw.get_info(name)
    record = {**info.as_dict(), **fields}
    subject = OBJ_META_PRE_TEMPLATE.format(
        bucket=jetstream.CODE_BUCKET, obj=base64.urlsafe_b64encode(name.encode()).decode()
    )
    await nc.jetstream().publish(
        subject, json.dumps(record).encode(), headers={"Nats-Rollup": "sub"}
    )


@pytest.mark.nats
@pytest.mark.anyio
async def test_a_bundle_larger_than_its_record_says_is_refused_past_the_cap(
    nc: NATS, tmp_path: Path
) -> None:
    """A node takes at most its cap of a bundle's bytes, whatever the object's record
    says its size is (before, a record that said fewer bytes than the stream held let
    the client's get read every chunk into memory); a bundle within it arrives whole."""
    store = await CodeStore.open(nc.jetstream())
    small = pack(write_package(tmp_path / "small", 2))
    ref, _ = await store.push("demo", small)
    with anyio.fail_after(4):
        assert await store.fetch(ref, max_bytes=len(small)) == small
    big = os.urandom(600 * 1024)  # five chunks of the client's 128 KiB
    big_ref, _ = await store.push("big", big)
    await _record_says(nc, str(big_ref), size=1000)
    with anyio.fail_after(4), pytest.raises(BundleError, match="holds more than the 100000 bytes"):
        await store.fetch(big_ref, max_bytes=100_000)
    # A record with chunks the stream does not hold is refused at once, not waited for.
    await _record_says(nc, str(ref), chunks=7)
    with anyio.fail_after(4), pytest.raises(BundleError, match="is truncated in the store"):
        await store.fetch(ref, max_bytes=len(small))
