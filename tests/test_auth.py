"""NATS authentication, tenants from the authenticated identity, API keys (issue 10).

Each attack runs against a platform with authentication on (every service its own
NATS user with least permissions, tenants in accounts of their own, HTTP and gRPC
wanting API keys: shared/auth.py) and must fail as the server or ingress refuses it,
while the legitimate call beside it still works. docs/security.md lists them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
import msgspec
import nats
import nats.errors
import numpy as np
import pytest
import tritonclient.grpc as triton
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from tritonclient.utils import InferenceServerException

from gfaas import cli
from gfaas.client import Client, connect_nats
from shared import auth, jetstream, subjects
from shared.errors import GfaasError
from shared.schema import (
    H_INVOCATION,
    H_TENANT,
    ErrorCode,
    FailureRecord,
    FunctionSpec,
    InvokeReply,
    InvokeRequest,
    OutputMode,
    SchedulerBeat,
    WorkerHeartbeat,
    decode,
    encode,
    new_invocation_id,
)
from shared.tensors import from_mapping
from tests.helpers import deploy_and_wait
from tests.platform import (
    PYTHON,
    REPO,
    Platform,
    auth_nats_server,
    auth_platform_at,
    free_port,
    gfaas_up,
)
from tests.platform import subprocess_env as base_env
from tests.specs import ECHO

pytestmark = [pytest.mark.nats]

BOOM = FunctionSpec(name="boom", handler="tests.funcs:boom")
X = {"x": np.arange(3, dtype=np.float32)}
VIOLATION = re.compile(r"permissions violation", re.I)


@dataclass
class Secured:
    platform: Platform
    url: str
    state_dir: Path
    auth_dir: Path
    keys: dict[str, str]

    def creds(self, identity: str) -> Path:
        return self.auth_dir / f"{identity}.json"

    def tenant_creds(self, tenant: str) -> Path:
        return self.auth_dir / "tenants" / f"{tenant}.json"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    state_dir = tmp_path / "state"
    auth_dir = state_dir / "auth"
    auth.ensure(auth_dir)
    keys = {t: auth.add_tenant(auth_dir, t)[1] for t in ("acme", "evil")}
    with (
        auth_nats_server(state_dir) as server,
        auth_platform_at(server.url, state_dir / "services", auth_dir) as p,
    ):
        secured = Secured(p, server.url, state_dir, auth_dir, keys)
        anyio.run(_deploy, secured)
        yield secured


async def _deploy(s: Secured) -> None:
    nc = await connect(s.url, s.creds("admin"))
    try:
        await deploy_and_wait(nc, ECHO, BOOM, timeout=30)
        # Until the scheduler has a worker: the first call must not race its heartbeat.
        with anyio.fail_after(30):
            while not (await Client(nc).status("scheduler")).details.get("workers"):
                await anyio.sleep(0.05)
    finally:
        await nc.drain()


async def connect(url: str, creds: Path | None, errors: list[Exception] | None = None) -> NATS:
    """A plain nats-py connection as `creds` (None: anonymous), its async errors
    (permission violations) collected in `errors`."""

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(exc)

    options = auth.connect_options(creds=creds) if creds else {}
    nc = NATS()
    try:
        await nc.connect(url, allow_reconnect=False, error_cb=on_error, **options)
    except BaseException:
        await nc.close()  # a refused connection leaves its socket open otherwise
        raise
    return nc


@pytest.fixture
async def admin(secured: Secured) -> AsyncIterator[NATS]:
    nc = await connect(secured.url, secured.creds("admin"))
    try:
        yield nc
    finally:
        await nc.drain()


async def violations(nc: NATS, errors: list[Exception], count: int = 1) -> list[str]:
    """The permission violations the server reported (waiting for `count`)."""
    await nc.flush()
    with anyio.move_on_after(2):
        while len([e for e in errors if VIOLATION.search(str(e))]) < count:
            await anyio.sleep(0.02)
    return [str(e) for e in errors if VIOLATION.search(str(e))]


async def invoke_echo(nc: NATS, **kwargs: Any) -> Any:
    reply = await Client(nc, **kwargs).invoke_reply("echo", X, outputs_by=OutputMode.HANDLE)
    assert reply.error is None, reply.error
    return reply


def tenants_of(reply: Any) -> set[str]:
    """The tenants the worker leased a reply's by-handle outputs for."""
    assert reply.outputs, reply
    assert all(t.handle is not None for t in reply.outputs), reply
    return {t.handle.tenant for t in reply.outputs}


# -- who may connect -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_anonymous_and_wrong_password_clients_are_refused(
    secured: Secured, admin: NATS
) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(secured.url, None)
    forged = secured.auth_dir / "forged.json"
    auth.Credentials("admin", "not-the-password").dump(forged)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(secured.url, forged)
    # gfaas's own client says so at once, naming what it used.
    with pytest.raises(ConnectionError, match="refused"):
        async with Client.connect(secured.url, creds=forged):
            pass
    # Beside it, the admin and a tenant get in and a call works.
    await invoke_echo(admin)
    tenant = await connect(secured.url, secured.tenant_creds("acme"))
    try:
        await invoke_echo(tenant, tenant_account="acme")
    finally:
        await tenant.drain()


@pytest.mark.anyio
async def test_a_refused_connection_is_one_connection_error_and_no_logged_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nats-py's default error callback logged the refusal ("nats: encountered error",
    # with its traceback) before connect_nats raised it as the ConnectionError: a
    # retry loop (bench.auth_overhead's, waiting for a reloaded server) printed one.
    with auth_nats_server(tmp_path) as server:
        forged = tmp_path / "forged.json"
        auth.Credentials("admin", "not-the-password").dump(forged)
        with caplog.at_level(logging.DEBUG), pytest.raises(ConnectionError, match="refused"):
            await connect_nats(server.url, creds=forged)
        assert not [r for r in caplog.records if r.name.startswith("nats")], caplog.text
        # Once connected, async errors are still reported as nats-py does by default.
        nc = await connect_nats(server.url, creds=tmp_path / "auth" / "admin.json")
        try:
            with caplog.at_level(logging.DEBUG):
                await nc._error_cb(RuntimeError("slow consumer, say"))
            assert "nats: encountered error" in caplog.text
        finally:
            await nc.drain()


@pytest.mark.anyio
async def test_a_tenant_listening_on_everything_hears_nothing_of_another_tenant(
    secured: Secured,
) -> None:
    errors: list[Exception] = []
    evil = await connect(secured.url, secured.tenant_creds("evil"), errors)
    acme = await connect(secured.url, secured.tenant_creds("acme"))
    heard: list[Msg] = []

    async def hear(msg: Msg) -> None:
        heard.append(msg)

    try:
        for subject in ("gfaas.>", "_INBOX.>", f"{auth.tenant_inbox('acme')}.>", ">"):
            await evil.subscribe(subject, cb=hear)
        assert len(await violations(evil, errors, 4)) == 4
        # Its own inbox it may hear: nobody else's replies come there.
        await evil.subscribe(f"{auth.tenant_inbox('evil')}.>", cb=hear)
        await evil.flush()
        for _ in range(5):
            await invoke_echo(acme, tenant_account="acme")
        await anyio.sleep(0.2)
        assert heard == []
    finally:
        await acme.drain()
        await evil.close()


@pytest.mark.anyio
async def test_a_service_hears_no_replies_meant_for_another_identity(
    secured: Secured, admin: NATS
) -> None:
    # The worker's credentials are what handler code has: it must not hear the admin's
    # replies (nor those of plain clients on the default inbox, nor other services').
    errors: list[Exception] = []
    worker = await connect(secured.url, secured.creds("gpu-worker"), errors)
    password = json.loads(secured.creds("admin").read_text())["password"]
    plain = await nats.connect(secured.url, user="admin", password=password)
    heard: list[Msg] = []

    async def hear(msg: Msg) -> None:
        heard.append(msg)

    try:
        for identity in ("admin", "ingress", "scheduler"):
            await worker.subscribe(f"{auth.inbox(identity)}.>", cb=hear)
        await worker.subscribe("_INBOX.>", cb=hear)
        seen = await violations(worker, errors, 4)
        assert len(seen) == 4, seen
        # (nats-py writes the server's error in lower case.)
        assert any('"_inbox_admin.>"' in v for v in seen), seen
        assert any('"_inbox.>"' in v for v in seen), seen
        # Its own inbox it may hear: its requests' replies come there (and those of
        # every connection of its identity: the real worker's, docs/security.md).
        await worker.subscribe(f"{auth.inbox('gpu-worker')}.>")
        await worker.flush()
        assert len(await violations(worker, errors, 5)) == 4
        # Beside it, the admin's calls (its own inbox) and a plain nats-py client's
        # (the default `_INBOX.`, which every service may still answer) work.
        for _ in range(3):
            await invoke_echo(admin)
            await invoke_echo(plain)
        assert (await Client(admin).status("scheduler")).service == "scheduler"
        await anyio.sleep(0.2)
        assert heard == []
    finally:
        await worker.close()
        await plain.drain()


@pytest.mark.anyio
async def test_an_instances_credentials_cannot_pose_as_its_agent_or_worker(
    secured: Secured, admin: NATS
) -> None:
    """Handler code in an instance holds the instances' identity, not the worker's: it
    cannot hear deploy checks (and pass any handler), profile requests (and answer
    with made-up figures), its agent's commands or the worker's replies, nor send an
    agent's beats or profiles."""
    errors: list[Exception] = []
    instance = await connect(secured.url, secured.creds(auth.INSTANCE), errors)
    try:
        for subject in (
            subjects.HANDLER_CHECK,
            subjects.PROFILE,
            subjects.agent("w0", "start"),
            f"{auth.inbox('gpu-worker')}.>",
        ):
            await instance.subscribe(subject)
        await instance.publish(subjects.agent_beat("w0"), b"")
        await instance.publish(subjects.profiled("echo"), b"")
        await instance.publish(f"$KV.{jetstream.PROFILES_BUCKET}.echo", b"")
        seen = "\n".join(await violations(instance, errors, 7))
        for subject in ("handler_check", "profile", "agent.w0.start", "_inbox_gpu-worker"):
            assert subject in seen.lower(), (subject, seen)
        assert len(await violations(instance, errors, 7)) == 7, seen
        # What an instance does it still may: hear its runs, on its own inbox.
        await instance.subscribe(subjects.worker_run("i-1"))
        await instance.subscribe(f"{auth.inbox(auth.INSTANCE)}.>")
        await instance.flush()
        assert len(await violations(instance, errors, 8)) == 7
        await invoke_echo(admin)
    finally:
        await instance.close()


# -- forged workers --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_forged_heartbeats_are_refused_and_a_forged_worker_gets_nothing(
    secured: Secured, admin: NATS
) -> None:
    # A real heartbeat, renamed: what the issue's tester published.
    real = await admin.subscribe(subjects.heartbeat("w0"))
    msg = await real.next_msg(timeout=5)
    await real.unsubscribe()
    forged = msgspec.structs.replace(decode(msg.data, WorkerHeartbeat), worker_id="forged")
    errors: list[Exception] = []
    evil = await connect(secured.url, secured.tenant_creds("evil"), errors)
    ingress = await connect(secured.url, secured.creds("ingress"), errors)
    stolen: list[Msg] = []

    async def steal(m: Msg) -> None:
        stolen.append(m)

    try:
        await evil.subscribe(subjects.worker_run("forged"), cb=steal)
        for _ in range(5):
            await evil.publish(subjects.heartbeat("forged"), encode(forged))
        assert len(await violations(evil, errors, 2)) >= 2
        # Nor may another service than a worker say it is one.
        await ingress.publish(subjects.heartbeat("forged"), encode(forged))
        assert any("heartbeat.forged" in v for v in await violations(ingress, errors, 3))
        acme = await connect(secured.url, secured.tenant_creds("acme"))
        try:
            for _ in range(10):
                reply = await invoke_echo(acme, tenant_account="acme")
                assert reply.worker == "w0"
        finally:
            await acme.drain()
        workers = (await Client(admin).status("scheduler")).details.get("workers", {})
        assert "forged" not in workers
        assert stolen == []
    finally:
        await evil.close()
        await ingress.close()


# -- tenants come from the identity -----------------------------------------------------------


@pytest.mark.anyio
async def test_a_tenant_header_claiming_another_tenant_is_ignored(
    secured: Secured, admin: NATS
) -> None:
    errors: list[Exception] = []
    acme = await connect(secured.url, secured.tenant_creds("acme"), errors)
    try:
        # Outputs by handle carry the tenant the worker leased them for.
        claimed = await invoke_echo(acme, tenant="evil", tenant_account="acme")
        assert tenants_of(claimed) == {"acme"}
        plain = await invoke_echo(acme, tenant_account="acme")
        assert tenants_of(plain) == {"acme"}
        # Async invocations are not a tenant's (docs/security.md, what remains).
        await acme.publish(subjects.invoke_async("echo"), b"")
        assert await violations(acme, errors)
    finally:
        await acme.drain()
    # Inside the service account the header is the admin's to set.
    by_admin = await invoke_echo(admin, tenant="acme")
    assert tenants_of(by_admin) == {"acme"}


@pytest.mark.anyio
async def test_credentials_without_a_permission_are_refused_by_the_server(
    secured: Secured, admin: NATS
) -> None:
    errors: list[Exception] = []
    broker = await connect(secured.url, secured.creds("memory-broker"), errors)
    worker = await connect(secured.url, secured.creds("gpu-worker"), errors)
    scheduler = await connect(secured.url, secured.creds("scheduler"), errors)
    tenant = await connect(secured.url, secured.tenant_creds("acme"), errors)
    try:
        # Only the scheduler (and ingress, under a grant) sends work to a worker.
        await broker.publish(subjects.worker_run("w0"), b"")
        # Only the admin writes the registry or deletes streams: not handler code
        # running in a worker.
        evil = FunctionSpec(name="evil", handler="tests.funcs:echo")
        await worker.publish(f"$KV.{jetstream.FUNCTIONS_BUCKET}.evil", encode(evil))
        await worker.publish(f"$JS.API.STREAM.DELETE.KV_{jetstream.FUNCTIONS_BUCKET}", b"")
        # Only the broker serves broker subjects.
        await scheduler.subscribe(subjects.broker_all("local"))
        await tenant.publish(subjects.heartbeat("x"), b"")
        seen = "\n".join(
            [
                *await violations(broker, errors, 1),
                *await violations(worker, errors, 3),
                *await violations(scheduler, errors, 4),
                *await violations(tenant, errors, 5),
            ]
        )
        for subject in (
            "worker.w0.run",
            f"$KV.{jetstream.FUNCTIONS_BUCKET}.evil",
            "STREAM.DELETE",
            "broker.local",
            "heartbeat.x",
        ):
            assert subject.lower() in seen.lower(), (subject, seen)
        # The registry is as the admin left it, and works.
        registry = await Client(admin).registry()
        assert await registry.fetch("evil") is None
        assert await registry.fetch("echo") is not None
        await invoke_echo(admin)
    finally:
        for nc in (broker, worker, scheduler, tenant):
            await nc.close()


@pytest.mark.anyio
async def test_no_credentials_but_ingress_can_empty_or_take_from_the_async_queue(
    secured: Secured, admin: NATS
) -> None:
    """A stream updated to max_msgs 1 drops what it holds (a purge the permissions
    forbid by name); ingress's async consumer deleted, queued invocations wait for
    ever; pulled from it, another tenant's request is read and taken. Handler code
    (an instance's credentials) and the other services may do none of these."""
    stream, consumer = jetstream.INVOCATIONS_STREAM, jetstream.ASYNC_CONSUMER
    js = admin.jetstream()
    config = (await js.stream_info(stream)).config
    shrunk = json.dumps({**config.as_dict(), "max_msgs": 1}).encode()
    for identity in (auth.INSTANCE, "gpu-worker", "scheduler"):
        errors: list[Exception] = []
        nc = await connect(secured.url, secured.creds(identity), errors)
        try:
            for subject, body in (
                (f"$JS.API.STREAM.UPDATE.{stream}", shrunk),
                (f"$JS.API.CONSUMER.DELETE.{stream}.{consumer}", b""),
                (f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", b'{"batch": 1}'),
            ):
                with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    await nc.request(subject, body, timeout=0.5)
            seen = "\n".join(await violations(nc, errors, 3)).lower()
            for op in ("stream.update", "consumer.delete", "consumer.msg.next"):
                assert op in seen, (identity, op, seen)
        finally:
            await nc.close()
    assert (await js.stream_info(stream)).config.max_msgs == config.max_msgs
    assert (await js.consumer_info(stream, consumer)).name == consumer
    # Ingress itself still keeps the stream and serves the queue.
    client = Client(admin)
    assert (await finished(client, await client.invoke_async("echo", X))).outputs


@pytest.mark.anyio
async def test_each_service_may_hear_and_send_what_it_does(secured: Secured) -> None:
    """Least privilege, not less: a scheduler hears its peers' beats (a leader stepping
    down hands what waits to the one it heard, else answers it unavailable)."""
    errors: list[Exception] = []
    scheduler = await connect(secured.url, secured.creds("scheduler"), errors)
    try:
        beats = await scheduler.subscribe(subjects.SCHEDULER_ALIVE)
        try:
            beat = decode((await beats.next_msg(timeout=5)).data, SchedulerBeat)
        except nats.errors.TimeoutError:
            pytest.fail(f"no scheduler beat heard: {await violations(scheduler, errors)}")
        assert beat.active, beat
    finally:
        await scheduler.close()


@pytest.mark.anyio
async def test_the_admin_deploys_and_runs_async_under_authentication(
    secured: Secured, admin: NATS
) -> None:
    client = Client(admin)
    invocation_id = await client.invoke_async("echo", X)
    with anyio.fail_after(20):
        while True:
            reply = await client.result(invocation_id)
            if reply.error is None:
                break
            assert reply.error.code in ("pending", "not_found"), reply.error
            await anyio.sleep(0.05)
    assert reply.outputs


async def finished(client: Client, invocation_id: str) -> Any:
    """The result of an async invocation once it is in."""
    with anyio.fail_after(20):
        while True:
            reply = await client.result(invocation_id)
            if reply.error is None or reply.error.code not in ("pending", "not_found"):
                return reply
            await anyio.sleep(0.05)


def as_unknown(reply: Any, invocation_id: str) -> tuple[str, str]:
    """An answer with its id taken out: another tenant's id must read as a made-up one."""
    assert reply.error is not None, reply
    return str(reply.error.code), reply.error.reason.replace(invocation_id, "<id>")


@pytest.mark.anyio
async def test_a_tenant_runs_async_and_no_other_tenant_reads_its_result(
    secured: Secured, admin: NATS
) -> None:
    acme_nc = await connect(secured.url, secured.tenant_creds("acme"))
    evil_nc = await connect(secured.url, secured.tenant_creds("evil"))
    acme = Client(acme_nc, tenant_account="acme")
    evil = Client(evil_nc, tenant_account="evil")
    try:
        invocation_id = await acme.invoke_async("echo", X, invocation_id="mine")
        assert invocation_id == auth.tenant_invocation_id("acme", "mine")
        reply = await finished(acme, invocation_id)
        assert reply.error is None, reply.error
        assert reply.invocation_id == invocation_id
        assert reply.outputs[0].shape == [3]
        # Another tenant asking for it hears what it hears for an id nobody used; the
        # same id submitted by it is its own invocation, not acme's.
        unknown = auth.tenant_invocation_id("evil", "never-used")
        assert (
            as_unknown(await evil.result(invocation_id), invocation_id)
            == as_unknown(await evil.result(unknown), unknown)
            == ("not_found", "no result for invocation <id>")
        )
        theirs = await evil.invoke_async("echo", X, invocation_id=invocation_id)
        assert theirs != invocation_id
        assert auth.owns_invocation("evil", theirs)
        assert (await finished(evil, theirs)).error is None
        # The admin sees it under the id the tenant was given.
        assert (await Client(admin).result(invocation_id)).error is None
        # The tenant is the subject's: acme's async call claiming evil fails as acme's.
        claimed = Client(acme_nc, tenant="evil", tenant_account="acme")
        failing = await claimed.invoke_async("boom", X)
        assert (await finished(acme, failing)).error is not None
        assert await failure_tenant(admin, "boom", failing) == "acme"
    finally:
        await acme_nc.drain()
        await evil_nc.drain()


@pytest.mark.anyio
async def test_a_tenants_async_callback_reaches_it_alone(secured: Secured) -> None:
    errors: list[Exception] = []
    acme_nc = await connect(secured.url, secured.tenant_creds("acme"))
    evil_nc = await connect(secured.url, secured.tenant_creds("evil"), errors)
    acme = Client(acme_nc, tenant_account="acme")
    stolen: list[Msg] = []

    async def steal(msg: Msg) -> None:
        stolen.append(msg)

    try:
        await evil_nc.subscribe(f"{auth.tenant_callbacks('acme')}.>", cb=steal)
        assert await violations(evil_nc, errors)
        callback = f"{auth.tenant_callbacks('acme')}.results"
        sub = await acme_nc.subscribe(callback)
        invocation_id = await acme.invoke_async("echo", X, callback=callback)
        msg = await sub.next_msg(timeout=20)
        reply = decode(msg.data, InvokeReply)
        assert reply.error is None
        assert reply.invocation_id == invocation_id
        # A callback anywhere else is refused at submit, and nothing is queued.
        for elsewhere in (
            f"{auth.tenant_callbacks('evil')}.x",
            f"{auth.tenant_inbox('acme')}.x",
            f"{auth.tenant_callbacks('acme')}.*",
            subjects.result("x"),
        ):
            with pytest.raises(GfaasError, match="callback must be a subject under") as refused:
                await acme.invoke_async("echo", X, callback=elsewhere, invocation_id="cb")
            assert refused.value.code is ErrorCode.BAD_REQUEST
        gone = await acme.result(auth.tenant_invocation_id("acme", "cb"))
        assert gone.error is not None
        assert gone.error.code is ErrorCode.NOT_FOUND
        assert stolen == []
    finally:
        await acme_nc.drain()
        await evil_nc.close()


@pytest.mark.anyio
async def test_a_reply_a_tenant_sends_to_another_tenants_callbacks_passes_for_none_of_theirs(
    secured: Secured,
) -> None:
    """The server checks the subject a tenant publishes to, not the reply subject it
    names: acme can have its call's reply sent into evil's callbacks. Under acme's
    tag, the id it gave can never be one of evil's (before, acme named an id of
    evil's async invocations, computable from evil's name, and the reply it sent
    there read as that invocation's result)."""
    acme_nc = await connect(secured.url, secured.tenant_creds("acme"))
    evil_nc = await connect(secured.url, secured.tenant_creds("evil"))
    try:
        callback = f"{auth.tenant_callbacks('evil')}.results"
        sub = await evil_nc.subscribe(callback)
        await evil_nc.flush()
        evils = auth.tenant_invocation_id("evil", "job-1")  # one of evil's ids
        body = encode(InvokeRequest(inputs=from_mapping(X)))
        await acme_nc.publish(
            auth.tenant_invoke("acme", "echo"),
            body,
            reply=callback,
            headers={H_INVOCATION: evils},
        )
        forged = decode((await sub.next_msg(timeout=20)).data, InvokeReply)
        assert forged.invocation_id == auth.tenant_tag("acme") + evils
        assert not auth.owns_invocation("evil", forged.invocation_id)
        # acme's own calls keep an id it gave under its tag, as its async ones do.
        reply = await Client(acme_nc, tenant_account="acme").invoke_reply(
            "echo", X, invocation_id="mine"
        )
        assert reply.error is None, reply.error
        assert reply.invocation_id == auth.tenant_invocation_id("acme", "mine")
    finally:
        await acme_nc.drain()
        await evil_nc.close()


@pytest.mark.anyio
async def test_a_tenant_cannot_publish_another_tenants_async_subjects(
    secured: Secured, admin: NATS
) -> None:
    errors: list[Exception] = []
    evil = await connect(secured.url, secured.tenant_creds("evil"), errors)
    acme = Client(await connect(secured.url, secured.tenant_creds("acme")), tenant_account="acme")
    try:
        invocation_id = await acme.invoke_async("echo", X)
        await evil.publish(auth.tenant_invoke_async("acme", "echo"), b"")
        await evil.publish(auth.tenant_result("acme", invocation_id), b"", reply="_INBOX_evil.x")
        seen = "\n".join(await violations(evil, errors, 2))
        assert "t.acme.invoke_async.echo" in seen, seen
        assert "t.acme.result" in seen, seen
        # acme's own work is untouched.
        assert (await finished(acme, invocation_id)).error is None
    finally:
        await evil.close()
        await acme.nc.drain()


# -- HTTP and gRPC --------------------------------------------------------------------------


async def failure_tenant(admin: NATS, function: str, invocation_id: str) -> str:
    """The tenant the failure log recorded for one invocation."""
    js = admin.jetstream()
    with anyio.fail_after(10):
        while True:
            try:
                raw = await js.get_last_msg(jetstream.LOGS_STREAM, subjects.logs(function))
                record = decode(raw.data or b"", FailureRecord)
                if record.invocation_id == invocation_id:
                    return record.tenant
            except nats.js.errors.NotFoundError:
                pass
            await anyio.sleep(0.05)


def infer_body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}


@pytest.mark.anyio
async def test_http_wants_an_api_key_and_the_key_names_the_tenant(
    secured: Secured, admin: NATS
) -> None:
    base = f"http://127.0.0.1:{secured.platform.http_port}"
    acme = {"Authorization": f"Bearer {secured.keys['acme']}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        with anyio.fail_after(30):
            while (await http.get("/v2/health/ready")).status_code != 200:
                await anyio.sleep(0.05)
        assert (await http.get("/v2/health/live")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer gfk_made-up"}, {"Authorization": "x"}):
            for method, path in (("GET", "/v2"), ("POST", "/v2/models/echo/infer")):
                response = await http.request(method, path, headers=headers, json=infer_body())
                assert response.status_code == 401, (path, headers)
                assert "unauthenticated" in response.json()["error"]
                assert response.headers["www-authenticate"].startswith("Bearer")
        ok = await http.post("/v2/models/echo/infer", headers=acme, json=infer_body())
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"][0]["data"] == [1, 2, 3]
        # acme's key with a header naming evil: the failure is logged as acme's.
        for key, expected in ((secured.keys["acme"], "acme"), (secured.keys["evil"], "evil")):
            iid = new_invocation_id()
            headers = {
                "Authorization": f"Bearer {key}",
                H_TENANT: "evil" if expected == "acme" else "acme",
                H_INVOCATION: iid,
            }
            failed = await http.post("/v2/models/boom/infer", headers=headers, json=infer_body())
            assert failed.status_code == 500
            assert await failure_tenant(admin, "boom", iid) == expected


def test_grpc_wants_an_api_key_but_health(secured: Secured) -> None:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{secured.platform.grpc_port}")
    key = {"authorization": f"Bearer {secured.keys['acme']}"}
    deadline = time.monotonic() + 30
    while not client.is_server_ready():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.is_server_live()
    with pytest.raises(InferenceServerException) as refused:
        client.get_server_metadata()
    assert refused.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
    assert "Bearer" in str(refused.value.message())
    assert client.get_server_metadata(headers=key).name
    x = triton.InferInput("x", [3], "FP32")
    x.set_data_from_numpy(X["x"])
    with pytest.raises(InferenceServerException):
        client.infer("echo", [x], headers={"authorization": "Bearer gfk_nope"})
    result = client.infer("echo", [x], headers=key)
    assert result.as_numpy("y").tolist() == [0.0, 1.0, 2.0]
    client.close()


def test_gfaas_invoke_with_a_tenants_credentials_in_the_environment_invokes_as_it(
    secured: Secured, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # README: gfaas commands use GFAAS_NATS_CREDS=FILE. With a tenant's file there,
    # Client.connect found the tenant only in a file passed to it, so `gfaas invoke`
    # published to the admin's subject, which the tenant may not: it hung for its
    # whole --timeout and said deadline_exceeded.
    monkeypatch.setenv("GFAAS_NATS_CREDS", str(secured.tenant_creds("acme")))
    argv = ["invoke", "echo", "-i", "x=[1,2]", "--timeout", "5", "--nats-url", secured.url]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "y float32[2]: [1. 2.]\n"


def test_gfaas_invoke_as_a_tenant_asks_for_outputs_by_value(
    secured: Secured, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A tenant may not release leases at the broker: outputs over the bus limit
    # are refused (payload_too_large), not sent by handle, then printed, and then
    # failed on as the release went unanswered ("internal: memory broker 'local'
    # did not answer release", five seconds later).
    async def deploy() -> None:
        nc = await connect(secured.url, secured.creds("admin"))
        try:
            await deploy_and_wait(nc, FunctionSpec(name="big", handler="tests.funcs:big_output"))
        finally:
            await nc.drain()

    anyio.run(deploy)
    monkeypatch.setenv("GFAAS_NATS_CREDS", str(secured.tenant_creds("acme")))
    capsys.readouterr()
    assert cli.main(["invoke", "big", "-i", "x=[1]", "--nats-url", secured.url]) == 2
    err = capsys.readouterr().err
    assert "gfaas: payload_too_large: reply of" in err, err


@pytest.mark.anyio
async def test_a_tenants_input_over_the_bus_limit_is_refused_at_once(secured: Secured) -> None:
    # A tenant may not lease at the memory broker: the client tried to move the
    # input into the pool by handle even so, and failed only when the lease request
    # went unanswered (five seconds later) with a reason about the broker.
    big = {"x": np.zeros(2 * 1024 * 1024 // 4, dtype=np.float32)}  # 2 MiB, over 1 MiB
    async with Client.connect(secured.url, creds=secured.tenant_creds("acme")) as acme:
        assert acme.tenant_account == "acme"
        started = time.monotonic()
        with pytest.raises(GfaasError) as caught:
            await acme.invoke("echo", big, timeout=10)
        took = time.monotonic() - started
        # Putting into the pool by hand is the same lease, refused as soon.
        started = time.monotonic()
        with pytest.raises(GfaasError) as put:
            await acme.put("x", big["x"])
        assert put.value.code is ErrorCode.PAYLOAD_TOO_LARGE, put.value
        assert time.monotonic() - started < 1.0
    assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE, caught.value
    assert took < 1.0, took
    reason = caught.value.reason
    assert "\n" not in reason, reason
    assert "bus limit of" in reason, reason
    assert "tenant" in reason, reason
    assert "shared-memory" in reason, reason
    assert "broker" not in reason, reason


# -- gfaas tenant add -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_tenant_add_issues_credentials_the_running_server_takes(
    secured: Secured, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["tenant", "add", "bob", "--state-dir", str(secured.state_dir), "--json"]) == 0
    issued = json.loads(capsys.readouterr().out)
    assert issued["reloaded"] is True
    assert Path(issued["creds"]) == secured.tenant_creds("bob")
    assert os.stat(issued["creds"]).st_mode & 0o077 == 0
    # The server reloads in the background: the new user works within moments.
    with anyio.fail_after(10):
        while True:
            try:
                async with Client.connect(secured.url, creds=issued["creds"]) as bob:
                    reply = await bob.invoke_reply("echo", X, outputs_by=OutputMode.HANDLE)
                    break
            except ConnectionError:
                await anyio.sleep(0.1)
    assert reply.error is None
    assert tenants_of(reply) == {"bob"}
    # And its API key, without restarting ingress.
    base = f"http://127.0.0.1:{secured.platform.http_port}"
    headers = {"Authorization": f"Bearer {issued['api_key']}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        with anyio.fail_after(10):
            while (response := await http.get("/v2", headers=headers)).status_code == 401:
                await anyio.sleep(0.1)
    assert response.status_code == 200
    # The old tenants are still in.
    acme = await connect(secured.url, secured.tenant_creds("acme"))
    await invoke_echo(acme, tenant_account="acme")
    await acme.drain()


@pytest.mark.anyio
async def test_tenant_revoke_takes_its_credentials_and_keys_away(secured: Secured) -> None:
    evil = await connect(secured.url, secured.tenant_creds("evil"))
    await invoke_echo(evil, tenant_account="evil")
    base = f"http://127.0.0.1:{secured.platform.http_port}"
    key = {"Authorization": f"Bearer {secured.keys['evil']}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        assert (await http.get("/v2", headers=key)).status_code == 200
        creds = secured.tenant_creds("evil")
        issued = creds.read_bytes()
        assert cli.main(["tenant", "revoke", "evil", "--state-dir", str(secured.state_dir)]) == 0
        assert not creds.exists()
        # Its key stops working without restarting ingress, its open connection is
        # dropped at the server's reload, and it cannot connect again.
        with anyio.fail_after(10):
            while (await http.get("/v2", headers=key)).status_code != 401:
                await anyio.sleep(0.1)
            while not evil.is_closed:
                await anyio.sleep(0.1)
        # The file it was issued (kept by the tenant) no longer gets in.
        creds.write_bytes(issued)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(secured.url, creds)
        # Another tenant is untouched, and revoking nobody says so.
        other = {"Authorization": f"Bearer {secured.keys['acme']}"}
        assert (await http.get("/v2", headers=other)).status_code == 200
    acme = await connect(secured.url, secured.tenant_creds("acme"))
    await invoke_echo(acme, tenant_account="acme")
    await acme.drain()
    assert cli.main(["tenant", "revoke", "nobody", "--state-dir", str(secured.state_dir)]) == 1


@pytest.mark.slow  # over 5 s on this machine: in CI, not the quick run
def test_each_service_answers_its_own_health_check(
    secured: Secured, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compose's healthcheck: `gfaas health SERVICE` with the container's own
    # credentials may ask that service, and only it.
    for service in auth.SERVICES:
        monkeypatch.setenv("GFAAS_NATS_CREDS", str(secured.creds(service)))
        assert cli.main(["health", service, "--any", "--nats-url", secured.url]) == 0, service
    monkeypatch.setenv("GFAAS_NATS_CREDS", str(secured.creds("memory-broker")))
    assert cli.main(["health", "ingress", "--any", "--nats-url", secured.url]) != 0


# -- gfaas up, authenticated by default ---------------------------------------------------------


@pytest.mark.slow
def test_gfaas_up_authenticates_by_default(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = base_env(GFAAS_HEARTBEAT_S="0.2", GFAAS_NATS_AUTH="true", GFAAS_STATE_DIR=str(state))
    env.pop("GFAAS_NATS_URL", None)
    spec = tmp_path / "add-one.toml"
    spec.write_text('name = "add-one"\nhandler = "tests.funcs:add_one"\nkind = "cpu"\n')
    http_port = free_port()
    with gfaas_up(env, "--http-port", str(http_port)) as up:
        assert "auth on" in up.line
        url = up.url

        def gfaas(*args: str) -> str:
            done = subprocess.run(
                [PYTHON, "-m", "gfaas", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        # The CLI finds the admin's credentials in the state directory.
        assert "deployed add-one" in gfaas("deploy", str(spec), "--nats-url", url)
        issued = json.loads(gfaas("tenant", "add", "acme", "--json"))

        async def calls() -> None:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await connect(url, None)
            with anyio.fail_after(60):
                while True:
                    try:
                        async with Client.connect(url, creds=issued["creds"]) as acme:
                            out = await acme.invoke("add-one", {"x": np.array([1.0])}, timeout=5)
                            break
                    except Exception:
                        await anyio.sleep(0.3)
            assert out["y"].tolist() == [2.0]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
                assert (await http.get("/v2/health/live")).status_code == 200
                assert (await http.get("/v2")).status_code == 401
                keyed = {"Authorization": f"Bearer {issued['api_key']}"}
                assert (await http.get("/v2", headers=keyed)).status_code == 200

        anyio.run(calls)
    assert up.code == 0


def test_a_tenants_shared_memory_regions_are_its_own(secured: Secured) -> None:
    import tritonclient.utils.shared_memory as shm

    url = f"127.0.0.1:{secured.platform.grpc_port}"
    acme = triton.InferenceServerClient(url=url)
    evil = triton.InferenceServerClient(url=url)
    as_acme = {"authorization": f"Bearer {secured.keys['acme']}"}
    as_evil = {"authorization": f"Bearer {secured.keys['evil']}"}

    def regions(client: triton.InferenceServerClient, headers: dict[str, str]) -> list[str]:
        status = client.get_system_shared_memory_status(headers=headers, as_json=True)
        return sorted(status.get("regions", {}))

    x = np.arange(3, dtype=np.float32)
    key = f"/gfaas-test-tenant-{secured.platform.grpc_port}"
    region = shm.create_shared_memory_region("input", key, x.nbytes)
    try:
        shm.set_shared_memory_region(region, [x])
        acme.register_system_shared_memory("input", key, x.nbytes, headers=as_acme)
        # evil sees none of acme's regions, cannot name one in an infer, and its
        # "unregister everything" leaves them.
        assert regions(evil, as_evil) == []
        inp = triton.InferInput("x", [3], "FP32")
        inp.set_shared_memory("input", x.nbytes)
        with pytest.raises(
            triton.InferenceServerException, match="no shared-memory region 'input'"
        ):
            evil.infer("echo", [inp], headers=as_evil)
        evil.unregister_system_shared_memory(headers=as_evil)
        assert regions(acme, as_acme) == ["input"]
        # Its own region of the same name is its own; acme's still serves acme.
        evil.register_system_shared_memory("input", key, x.nbytes, headers=as_evil)
        answer = acme.infer("echo", [inp], headers=as_acme)
        np.testing.assert_array_equal(answer.as_numpy("y"), x)
        acme.unregister_system_shared_memory(headers=as_acme)
        assert regions(evil, as_evil) == ["input"]
    finally:
        shm.destroy_shared_memory_region(region)
        acme.close()
        evil.close()


# -- without a server -------------------------------------------------------------------------


def test_tenant_ids_callbacks_and_names() -> None:
    from services.ingress.tenant_async import callback_problem

    mine = auth.tenant_invocation_id("a", "b-c")
    # A tag of fixed length: "a" given "b-c" is not "a-b" given "c".
    assert mine != auth.tenant_invocation_id("a-b", "c")
    assert auth.tenant_invocation_id("a", mine) == mine
    assert auth.owns_invocation("a", mine)
    assert not auth.owns_invocation("a-b", mine)
    assert callback_problem("acme", f"{auth.tenant_callbacks('acme')}.x.y") == ""
    for bad in ("", "gfaas.v1.tcb.acme", "gfaas.v1.tcb.acme.", "gfaas.v1.tcb.acme.>"):
        assert callback_problem("acme", bad), bad
    with pytest.raises(auth.AuthError, match="reserved"):
        auth.add_tenant(Path("/nonexistent"), "default")
    # Each service identity hears its own inbox, with credentials or user and password.
    assert auth.connect_options(user="gpu-worker", password="p")["inbox_prefix"] == (
        "_INBOX_gpu-worker"
    )
    assert "inbox_prefix" not in auth.connect_options(user="someone", password="p")
