"""GPU paths: run wherever CUDA is present, skip cleanly without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.specs import example_spec_paths
from examples.vision.classifier import Classifier
from examples.weights import make_vision_weights
from services.gpu_worker.device import memory_info, pick_device
from shared.function import LoadContext
from shared.spec import load_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_worker_picks_the_gpu_and_reports_its_memory() -> None:
    device = pick_device("auto")
    assert device == "cuda:0"
    mem = memory_info(device)
    assert mem.total > 0
    assert 0 < mem.free <= mem.total


def test_classifier_runs_on_the_gpu_and_matches_the_cpu(tmp_path: Path) -> None:
    spec = next(load_spec(p) for p in example_spec_paths() if p.stem == "classifier")
    weights = make_vision_weights(tmp_path / "cnn.pt")
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        gpu = Classifier(LoadContext(spec=spec, device="cuda:0", weights_path=weights))
        cpu = Classifier(LoadContext(spec=spec, device="cpu", weights_path=weights))
        on_gpu = gpu({"pixels": pixels})["logits"]
        on_cpu = cpu({"pixels": pixels})["logits"]
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)
