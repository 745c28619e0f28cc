"""Shared read-only weights (issue 9, SAGE): instances of one model on a CPU map the
host tier's one copy of its weights instead of each copying them; the copy is
counted once in the device's memory, and a write into it faults in the writer."""

from __future__ import annotations

import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS

from bench.live_models import mlp, write_mlp
from gfaas.client import Client, outputs_of
from shared import subjects
from shared.modelswap import HostTier
from shared.modelswap.device_share import ShareError, shared_views
from shared.modelswap.pipeline import SwapError, instantiate
from shared.natsd import NatsServer
from shared.scheduling import packing
from shared.scheduling.autoscale import Config
from shared.schema import (
    DeviceWeights,
    ErrorCode,
    FunctionSpec,
    InstanceInfo,
    WeightsReply,
    WeightsRequest,
    decode,
    encode,
)
from tests.helpers import agent_details, deploy_and_wait
from tests.platform import PYTHON, Platform, platform_at, subprocess_env
from tests.test_instances import wait_instances

MB = 1024 * 1024


def demand(name: str, model: str, memory: int, weights: int) -> packing.Demand:
    return packing.Demand(name, model, model, Config(0.1, 0.1), memory, weights)


def test_a_device_that_shares_weights_counts_each_models_weights_once() -> None:
    a1, a2 = demand("a1", "a", 100, 60), demand("a2", "a", 100, 60)
    b = demand("b1", "b", 100, 60)
    assert packing.memory_used([a1, a2, b], shares_weights=True) == 240
    assert packing.memory_used([a1, a2, b], shares_weights=False) == 300
    # Where it shares, a second instance of a model needs only its own working memory.
    device = packing.Device("d", memory_total=150, shares_weights=True)
    first = packing.add(device, a1)
    assert isinstance(first, packing.Device)
    assert packing.memory_needed(first, a2) == 40
    second = packing.add(first, a2)
    assert isinstance(second, packing.Device)
    assert second.memory_used == 140
    # Another model shares nothing with it.
    assert isinstance(packing.add(second, b), packing.Refused)
    # Without sharing the second copy does not fit.
    plain = packing.add(packing.Device("d", memory_total=150), a1)
    assert isinstance(plain, packing.Device)
    refused = packing.add(plain, a2)
    assert isinstance(refused, packing.Refused)
    assert "memory" in refused.reason


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[tuple[HostTier, Path]]:
    weights = tmp_path / "m4.pt"
    write_mlp(weights, 4, seed=3)
    host_tier = HostTier(f"gfaas-sw{tmp_path.name[-6:]}-model-")
    try:
        yield host_tier, weights
    finally:
        host_tier.purge()


def test_a_shared_model_answers_as_a_copied_one_and_copies_nothing(
    tier: tuple[HostTier, Path],
) -> None:
    host_tier, weights = tier
    host = host_tier.get_or_load("m4", "d1", lambda: weights)
    copied, _ = instantiate(lambda: mlp(4), host, "cpu", pipelined=False)
    shared, landed = instantiate(lambda: mlp(4), host, "cpu", shared=True)
    assert landed.done
    assert not landed.groups
    x = torch.randn(3, 512)
    with torch.inference_mode():
        torch.testing.assert_close(shared(x), copied(x), rtol=0, atol=0)
    # Every weight of the shared model lies in the read-only mapping of the segment.
    views = host.readonly_tensors()
    for name, tensor in shared.state_dict().items():
        assert tensor.data_ptr() == views[name].data_ptr(), name
        assert tensor.data_ptr() != copied.state_dict()[name].data_ptr()


def test_a_byte_copy_of_a_segment_lays_out_the_models_tensors(
    tier: tuple[HostTier, Path],
) -> None:
    """A device's shared copy (shared.modelswap.device_share) is the whole segment,
    byte for byte; the model's tensors are views of it laid out by the segment's own
    index. Checked here with a copy in host memory: the layout is the CPU's and the
    GPU's alike."""
    host_tier, weights = tier
    host = host_tier.get_or_load("m4", "d1", lambda: weights)
    flat = torch.frombuffer(bytearray(host.segment.mm), dtype=torch.uint8)
    views = host.views_of_copy(flat)
    assert views.keys() == host.tensors.keys()
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel()
    for name, tensor in host.tensors.items():
        torch.testing.assert_close(views[name], tensor, rtol=0, atol=0)
        assert start <= views[name].data_ptr() < end, name  # in the copy, not the tier
    with pytest.raises(Exception, match="not the segment's"):
        host.views_of_copy(flat[:-1])
    # An export of another segment (the model was pushed again meanwhile) is refused
    # before anything is mapped; a GPU model without an export is refused too.
    other = DeviceWeights(
        segment="gfaas-model-other",
        nbytes=flat.numel(),
        device=0,
        handle=b"",
        storage_bytes=flat.numel(),
        storage_offset=0,
        ref_counter_handle=b"",
        ref_counter_offset=0,
    )
    with pytest.raises(ShareError, match="changed meanwhile"):
        shared_views(host, other)
    with pytest.raises(SwapError, match="none was given"):
        instantiate(lambda: mlp(4), host, "cuda:0", shared=True)


def test_a_write_into_shared_weights_faults_in_the_writer_alone(
    tier: tuple[HostTier, Path],
) -> None:
    host_tier, weights = tier
    host = host_tier.get_or_load("m4", "d1", lambda: weights)
    before = host.tensors["0.weight"].clone()
    script = textwrap.dedent(
        f"""
        import torch
        from bench.live_models import mlp
        from shared.modelswap import HostTier
        from shared.modelswap.pipeline import instantiate
        host = HostTier({host_tier.prefix!r}).cached("m4", "d1")
        model, _ = instantiate(lambda: mlp(4), host, "cpu", shared=True)
        print("built", flush=True)
        with torch.no_grad():
            model[0].weight.add_(1.0)
        print("wrote")
        """
    )
    done = subprocess.run(
        [PYTHON, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert "built" in done.stdout, done.stderr
    assert "wrote" not in done.stdout
    assert done.returncode in (-signal.SIGSEGV, -signal.SIGBUS), (done.returncode, done.stderr)
    # What every other process reads is unchanged.
    torch.testing.assert_close(host.tensors["0.weight"], before, rtol=0, atol=0)


@pytest.fixture
def agent_platform(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(nats_server.url, tmp_path / "state", agent_memory_mb=400) as p:
        yield p


def mapped_by(pid: int) -> set[str]:
    """Shared-memory files `pid` maps read-only and shared ("r--s")."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {
        line.split(maxsplit=5)[5]
        for line in maps
        if len(line.split(maxsplit=5)) == 6 and line.split()[1] == "r--s" and "/dev/shm/" in line
    }


async def two_answering_instances(
    nc: NATS, tmp_path: Path, name: str, *, ready_s: float = 60.0, tolerance: float = 1e-5
) -> list[InstanceInfo]:
    """Two instances of a function over a 40 MiB MLP, each with a 150 MiB budget on
    the agent's 400 MiB (two copies would take 300 MiB, one 260 MiB), both ready
    and both answering concurrent calls with the model's own outputs."""
    client = Client(nc)
    weights = tmp_path / "m40.pt"
    model = mlp(40)  # 40 MiB of weights
    torch.save(model.state_dict(), weights)
    await client.push_model("m40", weights)
    # Fixed shares, so that both start at once, side by side.
    spec = FunctionSpec(
        name=name,
        handler="tests.funcs:SlowMlp",
        model="m40",
        min_instances=2,
        max_instances=2,
        memory_mb=150,
        sm_share=0.5,
        time_quota=0.5,
        idle_s=60.0,
        timeout_ms=60_000,
    )
    await deploy_and_wait(nc, spec)
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    hold = np.array([0.3], dtype=np.float32)
    instances = await wait_instances(nc, name, 2, timeout=ready_s, ready=True)
    answered: set[str] = set()

    async def call() -> None:
        reply = await client.invoke_reply(name, {"x": x, "hold_s": hold}, timeout=60)
        assert reply.error is None, reply.error
        np.testing.assert_allclose(
            outputs_of(reply)["y"], expected, rtol=tolerance * 10, atol=tolerance
        )
        answered.add(reply.worker)

    async with anyio.create_task_group() as tg:
        for _ in range(4):  # 0.3 s each, concurrently: both instances take some
            tg.start_soon(call)
    assert answered == {i.instance_id for i in instances}
    return instances


@pytest.mark.slow  # 7-14 s of instance processes: the default run stays under 10 minutes
@pytest.mark.nats
@pytest.mark.anyio
async def test_two_instances_of_one_function_map_one_copy_and_both_answer(
    agent_platform: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    instances = await two_answering_instances(nc, tmp_path, "mlp-shared", tolerance=1e-6)
    one, two = instances
    # The model's size as the store has it: its weights and the file's few KiB more.
    assert one.weight_bytes == two.weight_bytes
    assert 40 * MB < one.weight_bytes < 41 * MB
    # Both processes map the same segment of the host tier, read-only.
    common = mapped_by(one.pid) & mapped_by(two.pid)
    assert any("-model-" in path for path in common), (mapped_by(one.pid), mapped_by(two.pid))
    # The agent counts the copy once and says so.
    agent = await agent_details(client)
    assert agent["shares_weights"] is True
    assert agent["weights"] == {"m40": {"bytes": one.weight_bytes, "instances": 2}}
    assert agent["memory_used"] == 2 * 150 * MB - one.weight_bytes


@pytest.mark.nats
@pytest.mark.anyio
async def test_a_cpu_agent_makes_no_device_copies_and_none_for_strangers(
    agent_platform: Platform, nc: NATS
) -> None:
    """The agent's `weights` op (a CUDA instance's request for its device's copy) is
    answered, with why it is refused, and not for instances it did not start."""
    agent = await agent_details(Client(nc))
    assert agent["device_copies"] == {}
    ask = encode(WeightsRequest(instance_id="nobody", model="m40"))
    msg = await nc.request(subjects.agent(str(agent["agent_id"]), "weights"), ask, timeout=5)
    reply = decode(msg.data, WeightsReply)
    assert reply.weights is None
    assert reply.error is not None
    assert reply.error.code is ErrorCode.BAD_REQUEST
    assert "shares no device copies" in reply.error.reason
