"""Typed results: the wire response with its base64 payloads decoded into numpy arrays and PIL images."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from .images import decode_npy, decode_png
from .schemas import (
    ClassScore,
    DetectionImageResult,
    DetectionOut,
    DetectionTiming,
    ExplainResponse,
    ImageResult,
    JobOut,
    Timing,
)


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
    task: Literal["classification"] = "classification"  # narrows `Explanation | DetectionExplanation`

    @classmethod
    def from_wire(cls, r: ExplainResponse) -> Explanation:
        return cls(r.model, r.method, r.params, [ImageExplanation.from_wire(x) for x in r.results
                                                 if isinstance(x, ImageResult)])

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> ImageExplanation:
        return self.results[index]

    def __iter__(self):
        return iter(self.results)


@dataclass(frozen=True)
class Detection:
    """One detection and its map ("why did the model put this box here?"). `box` is (x1, y1, x2, y2) in pixels
    of the uploaded image; `map` is float32 HxW in [0, 1] over the whole image (when `npy` was asked)."""

    box: tuple[float, float, float, float]
    label: str
    label_index: int
    score: float
    height: int
    width: int
    map: np.ndarray | None = None
    png: Image.Image | None = None
    overlay: Image.Image | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, d: DetectionOut) -> Detection:
        x1, y1, x2, y2 = d.box
        return cls(box=(x1, y1, x2, y2), label=d.label, label_index=d.label_index, score=d.score,
                   height=d.map.height, width=d.map.width, map=decode_npy(d.map.npy),
                   png=decode_png(d.map.png), overlay=decode_png(d.map.overlay), diagnostics=d.diagnostics)


@dataclass(frozen=True)
class ImageDetections:
    """One image's answer from a detector: its size as uploaded (the boxes' frame) and a Detection per box
    explained, by score (empty when nothing was found). Iterate or index it for the detections."""

    width: int
    height: int
    detections: list[Detection]
    timing_ms: DetectionTiming | None = None

    @classmethod
    def from_wire(cls, r: DetectionImageResult) -> ImageDetections:
        return cls(r.width, r.height, [Detection.from_wire(d) for d in r.detections], r.timing_ms)

    def __len__(self) -> int:
        return len(self.detections)

    def __getitem__(self, index: int) -> Detection:
        return self.detections[index]

    def __iter__(self):
        return iter(self.detections)


@dataclass(frozen=True)
class DetectionExplanation:
    """A detection model's whole answer (`task` "detection"): an ImageDetections per image, in order."""

    model: str
    method: str
    params: dict[str, Any]
    results: list[ImageDetections]
    task: Literal["detection"] = "detection"

    @classmethod
    def from_wire(cls, r: ExplainResponse) -> DetectionExplanation:
        return cls(r.model, r.method, r.params, [ImageDetections.from_wire(x) for x in r.results
                                                 if isinstance(x, DetectionImageResult)])

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> ImageDetections:
        return self.results[index]

    def __iter__(self):
        return iter(self.results)


AnyExplanation = Explanation | DetectionExplanation


def from_wire(r: ExplainResponse) -> AnyExplanation:
    """The typed answer: a DetectionExplanation for a detection model's body (`task` "detection", or results
    holding `detections`), else an Explanation (a classifier's body leaves `task` out)."""
    if r.task == "detection" or any(isinstance(x, DetectionImageResult) for x in r.results):
        return DetectionExplanation.from_wire(r)
    return Explanation.from_wire(r)


Job = JobOut  # a job's state as the server reports it (status, progress, result when succeeded)
