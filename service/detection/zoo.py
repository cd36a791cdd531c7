"""Detection models from cards (`task = "detection"`): built, their weights loaded safely, kept beside the
classifiers in the registry (`ModelRegistry.detectors`).

Architectures:
- "builtin:mtcnn": facenet-pytorch's MTCNN face detector; `[weights]` names the folder holding its pnet.pt,
  rnet.pt and onet.pt (`package = "facenet_pytorch"`, `file = "data"`: the ones its wheel ships).
- "torchvision:NAME": torchvision's detectors (service/detection/torchvision_detectors.py), weights a state
  dict the operator drops in the models directory, like the ResNet-50 card's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..zoo.cards import CardError, ModelCard
from ..zoo.registry import register_task_loader
from ..zoo.weights import WeightsMissing, _inside, package_file
from .base import LoadedDetector


def weights_folder(card: ModelCard, models_dir: Path) -> Path:
    """A card's weights that are a folder of files (MTCNN's three networks)."""
    spec = card.weights
    if spec.package:
        folder = package_file(spec.package, spec.file or "", card.name)
        if not folder.is_dir():
            raise WeightsMissing(card.name, f"package {spec.package!r} has no folder {spec.file!r}")
        return folder
    for rel in spec.path:
        folder = _inside(models_dir, rel, card.name)
        if folder.is_dir():
            return folder
    raise WeightsMissing(card.name, f"weights folder not found (looked for {', '.join(spec.path)})")


def load_detector(card: ModelCard, models_dir: Path, device: torch.device) -> LoadedDetector:
    """The card's detector with its weights; CardError (WeightsMissing: listed unavailable) otherwise."""
    if card.architecture == "builtin:mtcnn":
        from .mtcnn import MtcnnDetector

        try:
            detector = MtcnnDetector(weights_folder(card, models_dir), device, card.name)
        except ImportError as exc:
            raise CardError(card.name, "needs facenet-pytorch: pip install --no-deps facenet-pytorch==2.6.0 "
                                       f"(it pins an old torch; it runs on this one): {exc}") from exc
        return LoadedDetector(card, detector.detect, detector.labels, device)
    if card.family == "torchvision":
        from .torchvision_detectors import load_torchvision_detector

        return load_torchvision_detector(card, models_dir, device)
    raise CardError(card.name, f"unknown detection architecture {card.architecture!r} (builtin:mtcnn or a "
                               "torchvision detector)")


register_task_loader("detection", load_detector)
