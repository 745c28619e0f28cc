"""Attacks an outside tester made (issue 10), run against the live platform: each must
fail with the right error while the legitimate call beside it still works.

Covered here: names (`../`, spaces, NATS wildcards), handlers outside the node's
allow-list (at deploy, and written straight into the registry), the data plane
(unguessable lease ids, strangers told only "no lease", bytes zeroed between tenants,
bounded TTLs, per-tenant quotas) and the HTTP shared-memory extension (gfaas's own
segments, symlinks, other owners, offsets). NATS authentication and HTTP tokens are
not in place yet (docs/security.md): a tenant here is still the header it sends.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from msgspec.structs import replace
from nats.aio.client import Client as NATS

from gfaas.client import Client
from shared import jetstream
from shared.dataplane.board import board_name
from shared.dataplane.client import BrokerClient, read_bytes, write_bytes
from shared.dataplane.shm import SHM_DIR, create_segment, list_segments, unlink_segment
from shared.errors import GfaasError
from shared.names import check_name
from shared.natsd import NatsServer
from shared.schema import CopyRequest, FunctionSpec, Handle, encode
from tests.helpers import body, deploy_and_wait, request
from tests.platform import Platform, platform_at
from tests.specs import ADD_ONE, ECHO

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

MB = 1024 * 1024


async def wait_known(nc: NATS, name: str) -> None:
    """Until ingress's registry watch has `name`."""
    with anyio.fail_after(10):
        while name not in (await Client(nc).status("ingress")).details.get("functions", []):
            await anyio.sleep(0.05)


async def lease_when_up(broker: BrokerClient, tenant: str, nbytes: int = 1024) -> Handle:
    """A lease for `tenant`, once the broker answers (it may still be starting)."""
    with anyio.fail_after(30):
        while True:
            try:
                (h,) = await broker.lease([nbytes], owner="test", tenant=tenant)
                return h
            except GfaasError as exc:
                if "no memory broker" not in exc.reason and "did not answer" not in exc.reason:
                    raise
                await anyio.sleep(0.05)


# -- names --------------------------------------------------------------------------------


BAD_NAMES = ["../x", "a b", "a*", "a>", "a.b", "a/b", "", "x" * 64]


async def test_bad_names_are_refused_at_deploy_push_and_invoke_and_good_ones_work(
    platform: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"\0" * 64)
    for name in BAD_NAMES:
        with pytest.raises(ValueError, match=r"function name .* must match"):
            await client.deploy(FunctionSpec(name=name, handler="tests.funcs:echo"))
        with pytest.raises(ValueError, match=r"model name .* must match"):
            await client.push_model(name, weights)
        if name:  # (model "" is no model)
            spec = FunctionSpec(name="fine", handler="tests.funcs:echo", model=name)
            with pytest.raises(ValueError, match=r"model name .* must match"):
                await client.deploy(spec)
        with pytest.raises(ValueError, match=r"function name .* must match"):
            await client.invoke(name, {"x": np.ones(2, np.float32)})
    assert await client.functions() == []
    assert await client.models() == []
    # Beside them, good names work.
    assert await client.push_model("good-model_1", weights) == 64
    await deploy_and_wait(nc, FunctionSpec(name="good-fn_1", handler="tests.funcs:echo"))
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal((await client.invoke("good-fn_1", {"x": x}))["y"], x)


async def test_a_model_named_with_dot_dot_never_leaves_the_worker_cache(
    platform: Platform, nc: NATS
) -> None:
    # The store itself takes any object name: put one there and a spec naming it
    # straight into the registry, as anyone on the bus could.
    js = nc.jetstream()
    store = await jetstream.models_store(js)
    await store.put("../../escape", b"\0" * 64)
    kv = await jetstream.functions_kv(js)
    spec = FunctionSpec(name="escaper", handler="tests.funcs:Scale", model="../../escape")
    await kv.put("escaper", encode(spec))
    await wait_known(nc, "escaper")
    _, reply = await request(nc, "escaper", body(x=np.ones(2, np.float32)))
    assert reply["error"]["code"] == "model_unavailable"
    assert "model name '../../escape' must match" in reply["error"]["reason"]
    written = [p for p in platform.state_dir.parent.rglob("*escape*")]
    assert written == []
    # A legit function beside it still serves.
    await deploy_and_wait(nc, ECHO)
    _, ok = await request(nc, "echo", body(x=np.ones(2, np.float32)))
    assert ok.get("error") is None


async def test_a_bad_tenant_name_is_refused_by_the_broker(platform: Platform, nc: NATS) -> None:
    broker = BrokerClient(nc, "local")
    good = await lease_when_up(broker, "acme")
    for tenant in ("a*", "a>", "a.b", "../x"):
        with pytest.raises(GfaasError) as info:
            await broker.lease([16], owner="test", tenant=tenant)
        assert info.value.code == "bad_request"
        assert "tenant name" in info.value.reason
    await broker.release([good], "test", "acme")


# -- handlers ---------------------------------------------------------------------------


OUTSIDE = [
    ("subprocess:run", "module 'subprocess' is in none of its handler packages"),
    ("os:system", "module 'os' is in none of its handler packages"),
    ("builtins:eval", "module 'builtins' is in none of its handler packages"),
    # Allowed module, but what it names comes from elsewhere (tests.funcs imports os).
    ("tests.funcs:os.system", "it is defined in 'posix'"),
    ("tests.funcs:time.sleep", "it is defined in 'time'"),
    ("tests.funcs:__import__", "must be 'module:attr'"),
]


async def test_a_handler_outside_the_node_packages_is_refused_at_deploy(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    for ref, why in OUTSIDE:
        with pytest.raises(ValueError, match=r"not allowed on this node|must be") as info:
            await client.deploy(FunctionSpec(name="pwn", handler=ref))
        assert why in str(info.value)
    assert await client.functions() == []
    await deploy_and_wait(nc, ECHO)  # an allowed handler deploys beside them
    assert [f.name for f in await client.functions()] == ["echo"]


async def test_a_spec_written_straight_into_the_registry_runs_nothing(
    platform: Platform, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module on the worker's import path (it runs in this process) that leaves a
    # mark when imported: refusing it must come before any import.
    marker = tmp_path / "imported"
    (tmp_path / "gfaas_pwned.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef f(inputs):\n    return inputs\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    kv = await jetstream.functions_kv(nc.jetstream())
    specs = {"shell": "subprocess:run", "system": "os:system", "pwned": "gfaas_pwned:f"}
    for name, ref in specs.items():
        # Plain nats-py, no gfaas client: no deploy check ran.
        await kv.put(name, encode(FunctionSpec(name=name, handler=ref)))
    for name, ref in specs.items():
        await wait_known(nc, name)
        _, reply = await request(nc, name, body(x=np.ones(2, np.float32)))
        assert reply["error"]["code"] == "handler_error", reply
        assert f"handler {ref!r} is not allowed on this node" in reply["error"]["reason"]
    assert not marker.exists()
    assert "gfaas_pwned" not in sys.modules
    await deploy_and_wait(nc, ECHO)
    _, ok = await request(nc, "echo", body(x=np.ones(2, np.float32)))
    assert ok.get("error") is None


# -- data plane ---------------------------------------------------------------------------


async def test_lease_ids_are_unguessable_and_strangers_hear_only_no_such_lease(
    platform: Platform, nc: NATS
) -> None:
    acme = BrokerClient(nc, "local")
    h = await lease_when_up(acme, "acme", 4096)
    (h2,) = await acme.lease([4096], owner="test", tenant="acme")
    secret = np.arange(4096, dtype=np.uint8) % 251
    write_bytes(h, secret.tobytes())
    prefix, _, rand = h.lease_id.rpartition(".")
    assert re.fullmatch("[0-9a-f]{32}", rand), h.lease_id
    assert h2.lease_id.startswith(prefix + ".")
    assert h2.lease_id != h.lease_id

    def uniform(exc: GfaasError, lease_id: str) -> None:
        assert (exc.code, exc.reason) == ("not_found", f"no lease {lease_id} for tenant 'evil'")

    # "evil" holds acme's real handle (as if it leaked), as it is and relabelled, or
    # guesses ids as they used to be (sequential) with a forged generation.
    stolen = [h, replace(h, tenant="evil"), replace(h, tenant="evil", generation=7)]
    guessed = [replace(h, tenant="evil", lease_id=f"{prefix}.{n:x}") for n in (1, 2, 3)]
    for handle in [*stolen, *guessed]:
        attempts = [
            evil_read(acme, handle),
            acme.check([handle], "evil"),
            acme.check([handle], "evil", retain="evil-w"),
            acme.retain([handle], "evil-w", "evil"),
            acme.release([handle], "test", "evil"),
            acme.transfer([handle], "test", "evil-w", "evil"),
            acme.park([handle], "test", "evil"),
            acme.unpark([handle], "test", "evil"),
            acme.copy(CopyRequest(source=handle, device="cpu", owner="evil-w"), "evil"),
            acme.lease([16], owner="evil-w", tenant="evil", check=[handle], retain="evil-w"),
        ]
        for attempt in attempts:
            with pytest.raises(GfaasError) as info:
                await attempt
            uniform(info.value, handle.lease_id)
    # Nothing of acme's moved: its bytes read back, its references release.
    assert await acme.read(h, "acme", chunk=1 << 16) == secret.tobytes()
    await acme.check([h, h2], "acme")
    await acme.release([h, h2], "test", "acme")
    with pytest.raises(GfaasError, match="released"):  # its own tenant hears why
        await acme.check([h], "acme", retain="w")


async def evil_read(broker: BrokerClient, handle: Handle) -> bytes:
    return await broker.read(handle, "evil", chunk=1 << 16)


async def test_a_fresh_lease_never_holds_another_tenants_bytes(
    platform: Platform, nc: NATS
) -> None:
    broker = BrokerClient(nc, "local")
    n = 256 * 1024
    acme = await lease_when_up(broker, "acme", n)
    write_bytes(acme, b"\xab" * n)
    await broker.release([acme], "test", "acme")
    (evil,) = await broker.lease([n], owner="test", tenant="evil")
    # The same block (best fit, lowest address first), zeroed for its new tenant.
    assert (evil.segment, evil.offset) == (acme.segment, acme.offset)
    assert not read_bytes(evil).any()
    write_bytes(evil, b"\xcd" * n)
    await broker.release([evil], "test", "evil")
    (again,) = await broker.lease([n], owner="test", tenant="acme")
    assert (again.segment, again.offset) == (acme.segment, acme.offset)
    assert not read_bytes(again).any()
    details = (await Client(nc).status("memory-broker")).details
    assert details["scrubbed_bytes"] >= 2 * n
    await broker.release([again], "test", "acme")


async def test_lease_ttls_are_bounded(platform: Platform, nc: NATS) -> None:
    broker = BrokerClient(nc, "local")
    first = await lease_when_up(broker, "acme")
    for ttl in (math.inf, 1e9, math.nan, 3601.0):
        with pytest.raises(GfaasError) as info:
            await broker.lease([1024], owner="test", tenant="acme", ttl_s=ttl)
        assert info.value.code == "bad_request"
        assert "exceeds this node's maximum of 3600 s (GFAAS_MAX_LEASE_TTL_S)" in info.value.reason
    (ok,) = await broker.lease([1024], owner="test", tenant="acme", ttl_s=3600.0)
    details = (await Client(nc).status("memory-broker")).details
    assert details["leases"] == 2  # the refused ones took nothing
    await broker.release([first, ok], "test", "acme")


async def test_each_tenant_has_a_quota_of_pooled_bytes_and_leases(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    quotas = {"tenant_pool_mb": 1, "tenant_max_leases": 4}
    with platform_at(nats_server.url, tmp_path / "s", workers=0, **quotas):
        broker = BrokerClient(nc, "local")
        a = await lease_when_up(broker, "acme", MB // 2)
        (b,) = await broker.lease([MB // 2], owner="test", tenant="acme")
        with pytest.raises(GfaasError) as over:
            await broker.lease([1], owner="test", tenant="acme")
        assert over.value.code == "quota_exceeded"
        assert "tenant 'acme' holds 1048576 pooled bytes" in over.value.reason
        assert "GFAAS_TENANT_POOL_MB" in over.value.reason
        # Another tenant is not held back by acme's use.
        others = await broker.lease([1024] * 4, owner="test", tenant="other")
        with pytest.raises(GfaasError) as many:
            await broker.lease([1024], owner="test", tenant="other")
        assert many.value.code == "quota_exceeded"
        assert "GFAAS_TENANT_MAX_LEASES" in many.value.reason
        # A batch over quota takes nothing; room comes back with a release.
        await broker.release([a], "test", "acme")
        with pytest.raises(GfaasError, match="quota"):
            await broker.lease([MB // 4, MB // 4, 1], owner="test", tenant="acme")
        assert (await Client(nc).status("memory-broker")).details["leases"] == 5
        (c,) = await broker.lease([MB // 2], owner="test", tenant="acme")
        await broker.release([b, c], "test", "acme")
        await broker.release(others, "test", "other")


# -- HTTP shared memory -------------------------------------------------------------------


@pytest.fixture
async def shm_platform(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Platform]:
    ns = f"gfaas-s{secrets.token_hex(4)}"
    with platform_at(nats_server.url, tmp_path / "s", shm_namespace=ns) as p:
        p.shm_namespace = ns  # type: ignore[attr-defined]
        yield p


async def register(
    http: httpx.AsyncClient, name: str, key: str, byte_size: int, offset: int = 0
) -> httpx.Response:
    return await http.post(
        f"/v2/systemsharedmemory/region/{name}/register",
        json={"key": key, "byte_size": byte_size, "offset": offset},
    )


async def test_http_clients_register_only_shared_memory_they_created(
    shm_platform: Platform, nc: NATS
) -> None:
    p = shm_platform
    ns: str = p.shm_namespace  # type: ignore[attr-defined]
    await deploy_and_wait(nc, ADD_ONE)
    broker = BrokerClient(nc, "local")
    held = await lease_when_up(broker, "default")  # so the pool has a slab
    slabs = list_segments(f"{ns}-pool-")
    assert slabs
    tag = secrets.token_hex(4)
    mine, link, folder = f"sec-in-{tag}", f"sec-link-{tag}", f"sec-dir-{tag}"
    out = f"sec-out-{tag}"
    foreign = f"gfaas-other-pool-cpu-1-{tag}"  # another platform's slab on this host
    alien = f"sec-alien-{tag}"  # another user's segment
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    made = [create_segment(n, x.nbytes) for n in (mine, out, foreign, alien)]
    os.chown(SHM_DIR / alien, 12345, 12345)
    np.frombuffer(made[0].mm, np.float32)[:] = x.ravel()
    (SHM_DIR / link).symlink_to(SHM_DIR / slabs[0])
    (SHM_DIR / folder).mkdir()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.http_port}") as http:
            with anyio.fail_after(10):
                while (await http.get("/v2/health/ready")).status_code != 200:
                    await anyio.sleep(0.05)
            refused = {
                f"/{slabs[0]}": "one of gfaas's own segments",
                f"/{board_name(ns, 'local')}": "one of gfaas's own segments",
                f"/{foreign}": "one of gfaas's own segments",
                f"/{link}": "is a symbolic link",
                f"/{folder}": "cannot be opened",
                f"/{alien}": "belongs to uid 12345",
                "/../etc/passwd": "invalid shared-memory segment name",
            }
            for key, why in refused.items():
                r = await register(http, "stolen", key, 16)
                assert r.status_code == 400, (key, r.text)
                assert why in r.json()["error"], (key, r.text)
            r = await register(http, "in", f"/{mine}", 16, offset=x.nbytes)  # past its end
            assert r.status_code == 400
            assert "outside" in r.json()["error"]
            assert (await http.get("/v2/systemsharedmemory/status")).json() == []
            # The client's own regions work, and offsets stay inside them.
            assert (await register(http, "in", f"/{mine}", x.nbytes)).status_code == 200
            assert (await register(http, "out", f"/{out}", x.nbytes)).status_code == 200
            shm_in = {"shared_memory_region": "in", "shared_memory_byte_size": x.nbytes}
            infer: dict[str, Any] = {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [2, 3],
                        "datatype": "FP32",
                        "parameters": shm_in,
                    }
                ],
                "outputs": [
                    {
                        "name": "y",
                        "parameters": {
                            "shared_memory_region": "out",
                            "shared_memory_byte_size": x.nbytes,
                        },
                    }
                ],
            }
            r = await http.post("/v2/models/add-one/infer", json=infer)
            assert r.status_code == 200, r.text
            got = np.frombuffer(made[1].mm, np.float32).reshape(2, 3)
            np.testing.assert_array_equal(got, x + 1)
            shm_in["shared_memory_offset"] = 8
            r = await http.post("/v2/models/add-one/infer", json=infer)
            assert r.status_code == 400
            assert "do not fit" in r.json()["error"]
            await http.post("/v2/systemsharedmemory/unregister")
    finally:
        for seg in made:
            seg.close()
        for n in (mine, out, foreign, alien):
            unlink_segment(n)
        (SHM_DIR / link).unlink()
        (SHM_DIR / folder).rmdir()
        await broker.release([held], "test", "default")


async def test_a_region_shrunk_after_registering_is_refused_and_ingress_stays_up(
    platform: Platform, nc: NATS
) -> None:
    """The client owns its segment and may shrink it under a registered region: the
    request naming it gets a 400, never a SIGBUS that kills ingress (and this test)."""
    await deploy_and_wait(nc, ADD_ONE)
    tag = secrets.token_hex(4)
    key_in, key_out = f"shrink-in-{tag}", f"shrink-out-{tag}"
    x = np.arange(3, dtype=np.float32).reshape(1, 3)
    for key in (key_in, key_out):
        (SHM_DIR / key).write_bytes(bytes(4096))
    shm = {"shared_memory_byte_size": x.nbytes}
    by_shm: dict[str, Any] = {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 3],
                "datatype": "FP32",
                "parameters": {"shared_memory_region": "in", **shm},
            }
        ]
    }
    to_shm: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "y", "parameters": {"shared_memory_region": "out", **shm}}],
    }
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{platform.http_port}") as http:
            with anyio.fail_after(10):
                while (await http.get("/v2/health/ready")).status_code != 200:
                    await anyio.sleep(0.05)
            assert (await register(http, "in", f"/{key_in}", 4096)).status_code == 200
            assert (await register(http, "out", f"/{key_out}", 4096)).status_code == 200
            os.truncate(SHM_DIR / key_in, 8)  # part of the input is gone
            os.truncate(SHM_DIR / key_out, 0)
            for infer, region, size in ((by_shm, "in", 8), (to_shm, "out", 0)):
                r = await http.post("/v2/models/add-one/infer", json=infer)
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert f"region {region!r} is shorter than registered" in error, error
                assert f"is {size} bytes now" in error, error
            # Nothing was written into the shrunk output segment, and ingress still serves.
            assert (SHM_DIR / key_out).stat().st_size == 0
            r = await http.post("/v2/models/add-one/infer", json={"inputs": to_shm["inputs"]})
            assert r.status_code == 200, r.text
            # Grown back, the same registrations work again.
            for key in (key_in, key_out):
                os.truncate(SHM_DIR / key, 4096)
            with (SHM_DIR / key_in).open("r+b") as f:
                f.write(x.tobytes())
            to_shm["inputs"] = by_shm["inputs"]
            r = await http.post("/v2/models/add-one/infer", json=to_shm)
            assert r.status_code == 200, r.text
            got = np.frombuffer((SHM_DIR / key_out).read_bytes()[: x.nbytes], np.float32)
            np.testing.assert_array_equal(got, x.ravel() + 1)
            await http.post("/v2/systemsharedmemory/unregister")
    finally:
        for key in (key_in, key_out):
            unlink_segment(key)


async def test_a_claimed_size_the_region_cannot_hold_is_refused_before_leasing(
    platform: Platform, nc: NATS
) -> None:
    """A request claiming 1 GiB in a 12-byte region gets its 400 without the broker
    ever creating a slab for the claim."""
    await deploy_and_wait(nc, ADD_ONE)
    key = f"small-{secrets.token_hex(4)}"
    (SHM_DIR / key).write_bytes(bytes(12))
    rows = 2**30 // 12
    claim = {
        "inputs": [
            {
                "name": "x",
                "shape": [rows, 3],
                "datatype": "FP32",
                "parameters": {
                    "shared_memory_region": "small",
                    "shared_memory_byte_size": rows * 12,
                },
            }
        ]
    }
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{platform.http_port}") as http:
            with anyio.fail_after(10):
                while (await http.get("/v2/health/ready")).status_code != 200:
                    await anyio.sleep(0.05)
            assert (await register(http, "small", f"/{key}", 12)).status_code == 200
            r = await http.post("/v2/models/add-one/infer", json=claim)
            assert r.status_code == 400, r.text
            assert f"{rows * 12} bytes at offset 0 do not fit" in r.json()["error"]
            pool = (await Client(nc).status("memory-broker")).details["pools"]["cpu"]
            assert (pool["held"], pool["slabs_created"]) == (0, 0), pool
            await http.post("/v2/systemsharedmemory/unregister")
    finally:
        unlink_segment(key)


def test_the_one_name_pattern() -> None:
    for name in BAD_NAMES:
        with pytest.raises(ValueError, match="must match"):
            check_name("model", name)
    for name in ("a", "resnet-50", "text_encoder2", "0" * 63):
        check_name("tenant", name)
