"""Per-model inference statistics for Triton's statistics extension, kept by the HTTP
front for the inferences it served. Pure books: the caller passes the clock."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class ModelStats:
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)


class InferenceStats:
    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}

    def record(self, model: str, *, ok: bool, ns: int, now_ms: int) -> None:
        stats = self.models.setdefault(model, ModelStats())
        (stats.success if ok else stats.fail).add(ns)
        stats.last_inference_ms = now_ms

    def of(self, model: str) -> ModelStats:
        return self.models.get(model) or ModelStats()
