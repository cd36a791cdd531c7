"""Typed results: the wire response with its base64 payloads decoded into numpy arrays and PIL images."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .images import decode_npy, decode_png
from .schemas import ClassScore, ExplainResponse, ImageResult, JobOut, Timing


@dataclass(frozen=True)
class ImageExplanation:
    """One image's answer. `map` is float32 HxW in [0, 1] (when `npy` was asked, the default)."""

    target: int
    label: str
    probability: float
    top_k: list[ClassScore]
    height: int
    width: int
    map: np.ndarray | None = None
    png: Image.Image | None = None
    overlay: Image.Image | None = None
    raw: np.ndarray | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    timing_ms: Timing | None = None
    # with outputs "metrics": deletion_auc, insertion_auc, their random-order baselines (_random), the curves,
    # steps, replacement and stability (stochastic methods): how far to trust this map
    metrics: dict[str, Any] | None = None

    @classmethod
    def from_wire(cls, r: ImageResult) -> ImageExplanation:
        return cls(target=r.target, label=r.label, probability=r.probability, top_k=r.top_k,
                   height=r.map.height, width=r.map.width, map=decode_npy(r.map.npy),
                   png=decode_png(r.map.png), overlay=decode_png(r.map.overlay), raw=decode_npy(r.raw),
                   diagnostics=r.diagnostics, timing_ms=r.timing_ms, metrics=r.metrics)


@dataclass(frozen=True)
class Explanation:
    """A whole answer; iterate or index it for the per-image results, in the order the images were sent."""

    model: str
    method: str
    params: dict[str, Any]
    results: list[ImageExplanation]

    @classmethod
    def from_wire(cls, r: ExplainResponse) -> Explanation:
        return cls(r.model, r.method, r.params, [ImageExplanation.from_wire(x) for x in r.results])

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> ImageExplanation:
        return self.results[index]

    def __iter__(self):
        return iter(self.results)


Job = JobOut  # a job's state as the server reports it (status, progress, result when succeeded)
