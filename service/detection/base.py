"""What a detector gives the explanation methods: per image, its detections as tensors.

A detector is a callable `detect(images) -> list[Detections]` over a batch of images (B, 3, H, W), float in
[0, 1] (not normalised: masking black is multiplying these pixels; each detector normalises inside), boxes in
pixels of that input. D-RISE (drise.py) treats it as a black box; the per-box gradient methods need the
torchvision detectors' graph.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..zoo.cards import ModelCard


@dataclass(frozen=True)
class Detections:
    """One image's detections, K of them (K may be 0)."""

    boxes: torch.Tensor  # (K, 4) float, x1, y1, x2, y2 in pixels of the input
    labels: torch.Tensor  # (K,) long, class index
    scores: torch.Tensor  # (K,) float in [0, 1], the detector's confidence
    # (K, C) class probability vectors (D-RISE's similarity term) where the detector has them; None: one-hot
    # of `labels` (a detector of one class, or one that keeps only its top class)
    probs: torch.Tensor | None = None
    # (K,) objectness where the detector has it separately from the class score; None: `scores`
    objectness: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def class_vectors(self, num_classes: int) -> torch.Tensor:
        """(K, C): `probs`, or the one-hot of `labels`."""
        if self.probs is not None:
            return self.probs
        return torch.nn.functional.one_hot(self.labels.long(), num_classes).to(self.boxes.dtype)

    def objectness_or_score(self) -> torch.Tensor:
        return self.objectness if self.objectness is not None else self.scores

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Detections:
        return Detections(torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device),
                          torch.zeros(0, device=device))


DetectFn = Callable[[torch.Tensor], list[Detections]]


# the longest side an image is explained at: D-RISE runs N masked copies of it through the detector
MAX_SIDE = 640
# images per detector forward until the server sets the detector's own (budget.py: the cpu_pass_batch
# default on a CPU, measured memory on a GPU)
DEFAULT_PASS_BATCH = 8


@dataclass(eq=False)
class LoadedDetector:
    card: ModelCard
    detect: DetectFn  # (B, 3, H, W) in [0, 1] -> list[Detections], boxes in pixels of that input
    labels: tuple[str, ...]
    device: torch.device
    module: torch.nn.Module | None = None  # the differentiable model, where per-box gradients apply
    cam_layer: str | None = None  # its default Grad-CAM layer (the backbone's feature map)
    max_side: int = MAX_SIDE
    pass_batch: int = DEFAULT_PASS_BATCH  # most images per forward: D-RISE's masked copies (budget.py)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def num_classes(self) -> int:
        return len(self.labels)
