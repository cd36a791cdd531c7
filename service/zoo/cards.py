"""Model cards: one TOML file per model in the models directory.

A card says what to build, where its weights come from, how to preprocess, which labels to show and which
layer Grad-CAM uses by default. Cards are data: nothing in them is executed.

Only the architecture, the weights and (for a file) the labels are required. The preprocessing, the Grad-CAM
layer and the reshape transform are read from the model itself where the card leaves them out
(service/zoo/adapters.py); each value a card gives overrides the derived one, field by field (pydantic's
`model_fields_set` tells a written value from a default). The loaded model's card is the resolved one, with
every derived value written in.

Architectures: "timm:NAME", "torchvision:NAME", "builtin:NAME", or "hf:DIR": a Hugging Face image classifier
saved with `save_pretrained`, DIR its folder relative to the models directory (letters, digits and `_ . / -`;
no '..' segment, not absolute), built through transformers, the optional extra `hf` (service/zoo/hf.py). Its
num_classes, its preprocessing and, where the card leaves [labels] out, its labels (`source = "config"`: the
config's id2label) come from the folder.
"""
from __future__ import annotations

import logging
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


Task = Literal["classification", "detection"]


class CardError(ValueError):
    """A card that cannot be read or a model that cannot be built from it; the message names the card."""

    def __init__(self, card: str, problem: str):
        super().__init__(f"model card {card!r}: {problem}")
        self.card = card
        self.problem = problem


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsSpec(_Strict):
    # Exactly one source: files under the models directory (first existing wins), or a file an installed
    # package ships (found without importing the package).
    path: list[str] = Field(default_factory=list)
    package: str | None = None
    file: str | None = None
    # "strict": keys must match; "ordered": map source keys onto the model's keys in order, shapes checked
    # (for weights saved by another implementation of the same architecture).
    key_map: Literal["strict", "ordered"] = "strict"

    @field_validator("path", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class PreprocessSpec(_Strict):
    # A field the card leaves out comes from the architecture (timm's pretrained_cfg, torchvision's weights
    # metadata); the defaults below are what a builtin model gets.
    input_size: tuple[int, int] = (224, 224)  # (height, width)
    resize: Literal["whole"] = "whole"  # the whole image, no crop: the map must cover all of it
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class LabelsSpec(_Strict):
    # "config": an hf: model's config.json id2label (the default of an hf: card without [labels])
    source: Literal["imagenet-1k", "file", "config"] = "imagenet-1k"
    file: str | None = None  # one label per line, relative to the models directory


class CamSpec(_Strict):
    # None: the layer the model's adapter derives (the last stage the head pools; a ViT's last norm1).
    target_layer: str | None = None
    # "auto": the adapter's transform from the model's facts. "vit": patch tokens (prefix and grid from the
    # model), "swin": channels-last stages, "none": channels-first maps as they are.
    reshape: Literal["auto", "none", "vit", "swin"] = "auto"


class ModelCard(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    architecture: str = Field(pattern=r"^((timm|torchvision|builtin):[A-Za-z0-9_.]+|hf:[A-Za-z0-9_./-]+)$")
    description: str = ""
    # "detection": an object detector (service/detection/zoo.py): D-RISE and per-box maps, not the classifier
    # methods; its labels come from the detector (COCO's for torchvision's, "face" for MTCNN)
    task: Task = "classification"
    num_classes: int = Field(default=1000, ge=1)
    weights: WeightsSpec
    preprocess: PreprocessSpec = PreprocessSpec()
    labels: LabelsSpec = LabelsSpec()
    cam: CamSpec = CamSpec()
    source_file: str = ""

    @property
    def family(self) -> str:
        return self.architecture.split(":", 1)[0]

    @property
    def arch_name(self) -> str:
        return self.architecture.split(":", 1)[1]


def read_card(path: Path) -> ModelCard:
    """Parse and validate one card; errors name the card file and the problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CardError(path.stem, f"cannot read {path.name}: {exc}") from exc
    try:
        card = ModelCard.model_validate({**data, "source_file": path.name})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CardError(data.get("name", path.stem), f"invalid card {path.name}: {problems}") from exc
    w = card.weights
    if bool(w.path) == bool(w.package):
        raise CardError(card.name, "weights need exactly one of 'path' or 'package' (with 'file')")
    if w.package and not w.file:
        raise CardError(card.name, "weights.package needs weights.file (a path inside the package)")
    if card.labels.source == "file" and not card.labels.file:
        raise CardError(card.name, "labels.source = 'file' needs labels.file")
    if card.family == "hf" and (card.arch_name.startswith("/") or ".." in card.arch_name.split("/")):
        raise CardError(card.name, f"architecture {card.architecture!r}: the folder must be a relative path "
                                   "inside the models directory, without '..' segments")
    if card.labels.source == "config" and card.family != "hf":
        raise CardError(card.name, "labels.source = 'config' reads an hf: model's config.json; "
                                   f"{card.architecture} has none")
    return card


def discover_cards(models_dir: Path) -> list[Path]:
    """Card files directly in the models directory, in a stable order."""
    return sorted(p for p in models_dir.glob("*.toml") if p.is_file())


@dataclass(frozen=True)
class FoundCard:
    """A card of one of the models directories, or why it cannot be read. Its weights and labels are looked
    up in the directory it was found in (`base`)."""

    name: str
    base: Path
    card: ModelCard | None = None
    error: CardError | None = None


def find_cards(dirs: Sequence[Path]) -> list[FoundCard]:
    """The cards of `dirs` by name, a later directory's card replacing an earlier one's of the same name (a
    card that cannot be read goes by the name it gives, else its file's). Settings.card_dirs lists the
    directories: the shipped cards, then the models directory's."""
    found: dict[str, FoundCard] = {}
    for base in dirs:
        if not base.is_dir():
            log.warning("models directory %s does not exist: no cards read from it", base)
        for path in discover_cards(base):
            try:
                card = read_card(path)
            except CardError as exc:
                found[exc.card] = FoundCard(exc.card, base, error=exc)
            else:
                found[card.name] = FoundCard(card.name, base, card=card)
    return list(found.values())
