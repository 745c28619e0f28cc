"""Pipelined swap-in is correct: a first call (weights still landing) answers what a
warm call does, and the load time recorded is the time until the last group landed.

Every test throttles the copy (a sleep before each group), so the first forward
always runs ahead of the weights: without the per-operation guard these models
read weights not yet copied (garbage, or NaN).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from torch import nn

from examples.specs import example_spec_paths
from examples.text.encoder import TextEncoder
from examples.text.tokenize import tokenize
from examples.vision.classifier import Classifier
from examples.weights import make_text_weights, make_vision_weights
from services.gpu_worker.models import HandlerCache, cache_key
from shared.function import LoadContext
from shared.modelswap import HostModel, HostTier, instantiate, pipeline, tier_prefix
from shared.spec import load_spec

pytestmark = pytest.mark.unit

SPECS = {load_spec(p).name: load_spec(p) for p in example_spec_paths()}
KIB = 1024
MIB = 1024 * KIB
GROUP_SIZES = [256 * KIB, 2 * MIB, 64 * MIB]
DELAY_S = 0.003  # per group


@pytest.fixture(scope="module")
def tier() -> Iterator[HostTier]:
    host = HostTier(tier_prefix(f"gfaas-t{secrets.token_hex(4)}"))
    try:
        yield host
    finally:
        host.purge()


@pytest.fixture
def slow_copy(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Each group waits for the returned gate (open unless a test closes it), then
    DELAY_S, before it is copied."""
    gate = threading.Event()
    gate.set()
    copy = pipeline._copy_group

    def slow(group: Any) -> None:
        gate.wait(30)
        time.sleep(DELAY_S)
        copy(group)

    monkeypatch.setattr(pipeline, "_copy_group", slow)
    return gate


def publish(tier: HostTier, name: str, model: nn.Module, tmp: Path) -> HostModel:
    path = tmp / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return tier.get_or_load(name, "v1", lambda: path)


def ahead_of_the_copy(gate: threading.Event, swap: pipeline.SwapIn) -> None:
    """Opens `gate` shortly: the first forward starts before any weight has landed."""
    assert not swap.ready[0].is_set()
    threading.Timer(0.05, gate.set).start()


def first_and_warm(
    gate: threading.Event,
    factory: Callable[[], nn.Module],
    host: HostModel,
    group_bytes: int,
    *inputs: torch.Tensor,
) -> tuple[Any, Any]:
    gate.clear()
    model, swap = instantiate(factory, host, "cpu", group_bytes=group_bytes)
    ahead_of_the_copy(gate, swap)
    with torch.inference_mode():
        first = model(*inputs)
        swap.wait()
        swap.detach_hooks()
        warm = model(*inputs)
    return first, warm


def assert_same(first: Any, warm: Any) -> None:
    if isinstance(first, tuple):
        for a, b in zip(first, warm, strict=True):
            assert_same(a, b)
        return
    if first is None:
        assert warm is None
        return
    assert not torch.isnan(first).any()
    torch.testing.assert_close(first, warm, rtol=1e-4, atol=1e-5)


def deep_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(1024, 8, dim_feedforward=2048, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 8, enable_nested_tensor=False)


@pytest.fixture(scope="module")
def encoder(
    tier: HostTier, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, HostModel]:
    torch.manual_seed(1)
    model = deep_encoder().eval()
    return model, publish(tier, "deep-encoder", model, tmp_path_factory.mktemp("enc"))


@pytest.mark.parametrize("group_bytes", GROUP_SIZES)
def test_deep_transformer_first_call_equals_warm_call(
    encoder: tuple[nn.Module, HostModel], slow_copy: threading.Event, group_bytes: int
) -> None:
    reference, host = encoder
    x = torch.randn(2, 16, 1024, generator=torch.Generator().manual_seed(2))
    first, warm = first_and_warm(slow_copy, deep_encoder, host, group_bytes, x)
    assert_same(first, warm)
    with torch.inference_mode():  # warm takes the fused fast path, as the original does
        torch.testing.assert_close(warm, reference(x), rtol=1e-4, atol=1e-5)


def attention() -> nn.Module:
    return nn.MultiheadAttention(1024, 8, batch_first=True)


@pytest.mark.parametrize("group_bytes", [256 * KIB, 2 * MIB])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_waits_for_out_proj(
    tier: HostTier,
    tmp_path: Path,
    slow_copy: threading.Event,
    group_bytes: int,
    need_weights: bool,
) -> None:
    torch.manual_seed(3)
    host = publish(tier, f"mha-{group_bytes}-{need_weights}", attention().eval(), tmp_path)
    q = torch.randn(2, 10, 1024, generator=torch.Generator().manual_seed(4))
    slow_copy.clear()
    model, swap = instantiate(attention, host, "cpu", group_bytes=group_bytes)
    # out_proj is not called as a module: its weight is read by the functional kernel.
    assert any(n.startswith("out_proj.") for n in swap.groups[-1])
    ahead_of_the_copy(slow_copy, swap)
    with torch.inference_mode():
        first = model(q, q, q, need_weights=need_weights)
        swap.wait()
        warm = model(q, q, q, need_weights=need_weights)
    assert_same(first, warm)


class ReadsChildWeights(nn.Module):
    """A module that uses its child's weights without ever calling the child."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(512, 512)
        self.b = nn.Linear(512, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return nn.functional.linear(y, self.b.weight.t(), self.b.bias)


def test_a_module_reading_a_child_weight_functionally_waits_for_it(
    tier: HostTier, tmp_path: Path, slow_copy: threading.Event
) -> None:
    torch.manual_seed(5)
    reference = ReadsChildWeights().eval()
    host = publish(tier, "reads-child", reference, tmp_path)
    x = torch.randn(3, 512)
    first, warm = first_and_warm(slow_copy, ReadsChildWeights, host, 64 * KIB, x)
    assert_same(first, warm)
    with torch.inference_mode():
        torch.testing.assert_close(warm, reference(x))


def test_sequential_models_still_pipeline(
    tier: HostTier, tmp_path: Path, slow_copy: threading.Event
) -> None:
    """The first layer computes while later groups are still held back."""

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))

    torch.manual_seed(6)
    reference = factory().eval()
    host = publish(tier, "seq", reference, tmp_path)
    model, swap = instantiate(factory, host, "cpu", group_bytes=1)
    seen: list[bool] = []
    model[1].register_forward_hook(lambda *_: seen.append(swap.ready[-1].is_set()))
    slow_copy.clear()
    released = threading.Timer(0.2, slow_copy.set)
    released.start()
    x = torch.randn(2, 256)
    with torch.inference_mode():
        out = model(x)
    released.join()
    # The ReLU ran before the last layer's group had been copied.
    assert seen == [False]
    torch.testing.assert_close(out, reference(x))


EXAMPLES: dict[str, tuple[Any, Callable[[Path], Path], Callable[[], dict[str, torch.Tensor]]]] = {
    "classifier": (
        Classifier,
        make_vision_weights,
        lambda: {"pixels": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))},
    ),
    "text-encoder": (
        TextEncoder,
        make_text_weights,
        lambda: {"tokens": torch.from_numpy(tokenize("first equals warm"))},
    ),
}


@pytest.mark.parametrize("group_bytes", [16 * KIB, 2 * MIB])
@pytest.mark.parametrize("function", sorted(EXAMPLES))
def test_every_example_model_answers_its_first_call_right(
    tier: HostTier, tmp_path: Path, slow_copy: threading.Event, function: str, group_bytes: int
) -> None:
    handler_class, make_weights, make_inputs = EXAMPLES[function]
    spec = SPECS[function]
    weights = make_weights(tmp_path / f"{function}.pt")
    host = tier.get_or_load(f"{function}-{group_bytes}", "v1", lambda: weights)
    inputs = make_inputs()
    reference = handler_class(LoadContext(spec=spec, device="cpu", weights_path=weights))
    ctx = LoadContext(spec=spec, device="cpu", host=host, group_bytes=group_bytes)
    slow_copy.clear()
    handler = handler_class(ctx)
    (swap,) = ctx.swaps
    ahead_of_the_copy(slow_copy, swap)
    with torch.inference_mode():
        first = handler(inputs)
        expected = reference(inputs)
        swap.wait()
        warm = handler(inputs)
    for name in expected:
        assert_same(first[name], warm[name])
        torch.testing.assert_close(warm[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.anyio
async def test_recorded_load_time_runs_until_the_last_group_lands(
    tier: HostTier, tmp_path: Path, slow_copy: threading.Event
) -> None:
    weights = make_text_weights(tmp_path / "text.pt")

    async def fetch(name: str) -> Path:
        return weights

    cache = HandlerCache(
        device="cpu",
        threads=1,
        capacity_bytes=64 * MIB,
        fetch_weights=fetch,
        host_tier=tier,
        group_bytes=64 * KIB,
    )
    spec = SPECS["text-encoder"]
    key = cache_key(spec)
    inputs = {"tokens": torch.from_numpy(tokenize("how long did it take"))}

    def call(handler: Any) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return dict(handler(inputs))

    slow_copy.clear()
    async with cache.use(spec) as entry:
        (swap,) = entry.ctx.swaps
        assert not swap.done
        # Built, weights still landing: the heartbeat says "not measured yet".
        assert cache.report().load_s[key] == 0.0
        slow_copy.set()
        first = await anyio.to_thread.run_sync(call, entry.handler)
    assert swap.wait_landed(30)
    copy_s = swap.finished_at - swap.started_at
    assert copy_s >= len(swap.groups) * DELAY_S
    load_s = cache.report().load_s[key]
    assert load_s >= copy_s
    assert cache.cache.entries[spec.name].load_s == load_s  # what eviction weighs
    assert entry.load_ms >= copy_s * 1000.0
    assert cache.swap_ms_total == entry.load_ms
    async with cache.use(spec) as again:
        warm = await anyio.to_thread.run_sync(call, again.handler)
    np.testing.assert_allclose(first["embedding"], warm["embedding"], rtol=1e-4, atol=1e-5)


def test_a_model_built_under_inference_mode_swaps_in(
    tier: HostTier, tmp_path: Path, slow_copy: threading.Event
) -> None:
    """Its tensors are inference tensors: the copy thread must write them in that mode."""
    torch.manual_seed(8)
    reference = ReadsChildWeights().eval()
    host = publish(tier, "inference-built", reference, tmp_path)
    x = torch.randn(3, 512)
    with torch.inference_mode():
        model, swap = instantiate(ReadsChildWeights, host, "cpu", group_bytes=64 * KIB)
        first = model(x)
        swap.wait()
        torch.testing.assert_close(first, reference(x))
    assert swap.error is None
