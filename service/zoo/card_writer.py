"""Writing a model card from a model: what `python -m service add-model` puts in the TOML.

The card a user would otherwise write by hand, with every value the loader derives (preprocessing from the
architecture's own config, the Grad-CAM layer from its structure: service/zoo/adapters.py) written in, so a
reader sees what the server will do and can edit any of it.

TOML is written here rather than with a library: the standard library reads TOML but does not write it, and a
card is a fixed handful of scalars and short arrays, each written as a JSON literal (valid TOML for strings,
numbers and arrays of them). `read_card` reads every written card back before it is used.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cards import ModelCard

_NAME_CHARS = re.compile(r"[^a-z0-9_.-]+")


def card_name(architecture: str) -> str:
    """A card name from an architecture: `timm:convnext_tiny` -> `convnext_tiny`, `hf:models/My-ViT` ->
    `my-vit` (the card's name pattern: lowercase letters, digits, `_ . -`)."""
    tail = architecture.partition(":")[2].rstrip("/").rsplit("/", 1)[-1]
    name = _NAME_CHARS.sub("_", tail.lower()).strip("_.-")
    return name[:64] or "model"


def classifier_width(module: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The number of classes the weights were trained for: the output width of the model's last Linear layer
    as the state dict holds it (timm's and torchvision's classifiers are a Linear at the end of the
    module tree); None when the weights have no such key."""
    last = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and f"{name}.weight" in state:
            last = name
    if last is None:
        return None
    return int(state[f"{last}.weight"].shape[0])


def _value(v: Any) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return json.dumps(v)


def card_toml(card: ModelCard, header: str = "") -> str:
    """The card as TOML: every field but the bookkeeping (`source_file`), derived ones included."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key in ("name", "architecture", "description", "num_classes"):
        lines.append(f"{key} = {_value(getattr(card, key))}")
    sections = {"weights": card.weights.model_dump(exclude_defaults=True),
                "preprocess": card.preprocess.model_dump(),
                "labels": card.labels.model_dump(exclude_none=True),
                "cam": card.cam.model_dump(exclude_none=True)}
    for section, values in sections.items():
        lines += ["", f"[{section}]"] + [f"{k} = {_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_card(card: ModelCard, directory: Path, header: str = "") -> Path:
    path = directory / f"{card.name}.toml"
    path.write_text(card_toml(card, header), encoding="utf-8")
    return path
