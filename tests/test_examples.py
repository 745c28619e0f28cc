"""The example functions, called directly (no NATS): contracts match their specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from examples.specs import example_spec_paths
from examples.text.encoder import TextEncoder
from examples.text.tokenize import tokenize
from examples.vision.classifier import Classifier
from examples.vision.preprocess import preprocess
from examples.vision.topk import topk
from examples.weights import make_text_weights, make_vision_weights
from shared.function import LoadContext
from shared.schema import FunctionSpec
from shared.spec import load_spec
from shared.tensors import from_mapping

pytestmark = pytest.mark.unit

SPECS = {load_spec(p).name: load_spec(p) for p in example_spec_paths()}


def check_outputs(spec: FunctionSpec, outputs: dict[str, torch.Tensor]) -> None:
    tensors = {t.name: t for t in from_mapping(outputs)}
    assert set(tensors) == {o.name for o in spec.outputs}
    for want in spec.outputs:
        got = tensors[want.name]
        assert got.dtype == want.dtype
        assert len(got.shape) == len(want.shape)
        assert all(w in (-1, g) for g, w in zip(got.shape, want.shape, strict=True))


def test_every_example_spec_loads() -> None:
    assert set(SPECS) == {"noop", "preprocess", "classifier", "topk", "text-encoder"}


def test_vision_pipeline_composes_and_matches_its_specs(tmp_path: Path) -> None:
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    pixels = preprocess({"image": image})
    check_outputs(SPECS["preprocess"], pixels)
    weights = make_vision_weights(tmp_path / "cnn.pt")
    ctx = LoadContext(spec=SPECS["classifier"], device="cpu", weights_path=weights)
    with torch.inference_mode():
        logits = Classifier(ctx)(pixels)
    check_outputs(SPECS["classifier"], logits)
    top = topk(logits)
    check_outputs(SPECS["topk"], top)
    assert torch.all(top["probs"][0, :-1] >= top["probs"][0, 1:])


def test_example_weights_are_deterministic(tmp_path: Path) -> None:
    a = make_vision_weights(tmp_path / "a.pt")
    b = make_vision_weights(tmp_path / "b.pt")
    sa = torch.load(a, weights_only=True)
    sb = torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_text_encoder_gives_unit_embeddings(tmp_path: Path) -> None:
    weights = make_text_weights(tmp_path / "text.pt")
    encoder = TextEncoder(
        LoadContext(spec=SPECS["text-encoder"], device="cpu", weights_path=weights)
    )
    with torch.inference_mode():
        out = encoder({"tokens": torch.from_numpy(tokenize("hello gfaas"))})
    check_outputs(SPECS["text-encoder"], out)
    assert torch.allclose(out["embedding"].norm(dim=-1), torch.ones(1), atol=1e-5)
