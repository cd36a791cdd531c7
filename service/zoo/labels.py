"""Class names: ImageNet-1k (shipped in torchvision's code, no download), a text file, one per line, or an hf:
model's config.json id2label."""
from __future__ import annotations

from functools import cache
from pathlib import Path

from .cards import CardError, ModelCard
from .hf import HFError, folder
from .hf import labels as config_labels


@cache
def imagenet_labels() -> tuple[str, ...]:
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def load_labels(card: ModelCard, models_dir: Path) -> tuple[str, ...]:
    if card.labels.source == "imagenet-1k":
        labels = imagenet_labels()
    elif card.labels.source == "config":  # an hf: model's id2label
        try:
            labels = config_labels(folder(models_dir, card.arch_name))
        except HFError as exc:
            raise CardError(card.name, str(exc)) from exc
    else:
        path = (models_dir / (card.labels.file or "")).resolve()
        if not path.is_relative_to(models_dir.resolve()) or not path.is_file():
            raise CardError(card.name, f"labels file {card.labels.file!r} not found in {models_dir.name}/")
        labels = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(labels) != card.num_classes:
        raise CardError(card.name, f"{len(labels)} labels for {card.num_classes} classes")
    return labels
