"""Hugging Face image classifiers saved with `save_pretrained`: a card's `architecture = "hf:DIR"`.

DIR is a folder inside the card's models directory holding config.json (the architecture, which transformers'
`AutoModelForImageClassification.from_config` builds with random weights: nothing is downloaded, nothing in
the folder is executed), preprocessor_config.json where there is one (the image processor), and the weights,
which the card names like any other (`[weights] path = "DIR/model.safetensors"`) and which load, keys checked
strictly, only through service/zoo/weights.py into the transformers model (`HFClassifier.model`).

transformers is the optional extra `hf` (`pip install '.[hf]'`). It is imported inside the functions only, so
the service imports and runs without it; an hf: card is then listed unavailable, saying which extra it needs.

What the folder gives (each value a card writes still overrides it):
- num_classes: config.json's `num_labels`; a card's num_classes that disagrees fails the load naming both.
- labels: config.json's `id2label` (labels.source = "config", what an hf: card leaving [labels] out gets).
- preprocessing (`preprocess_values`): the image processor's size (the centre crop's where it crops, since
  that is what the model sees; {height, width}, or a shortest edge as a square), mean and std (folded with
  its rescale factor and do_normalize), and resample; the image is still resized whole, never cropped.
  Without a preprocessor_config.json: config.json's image_size, PreprocessSpec's defaults for the rest.
- the Grad-CAM layer and reshape: the "hf-vit" and "hf-stages" rules of service/zoo/adapters.py.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cards import CardError, LabelsSpec, ModelCard

EXTRA = "pip install '.[hf]'"
# PIL's resampling codes (Image.Resampling) that have a counterpart here; LANCZOS (1), BOX (4) and HAMMING (5)
# do not, and get PreprocessSpec's default, as timm's '' or 'random' do.
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class HFError(ValueError):
    """An hf: folder that cannot be used; the registry names the card (service/zoo/registry.py)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise HFError(f"needs the optional extra: {EXTRA} (transformers cannot be imported: {exc})") from exc
    return transformers


def folder(base: Path, rel: str) -> Path:
    """DIR of `hf:DIR`, inside `base` (the card's models directory) and holding a config.json. read_card
    refuses '..' and absolute paths already; this also refuses a symlink that leads out."""
    path = (base / rel).resolve()
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.is_relative_to(base.resolve()):
        raise HFError(f"folder {rel!r} leaves {base}")
    if not (path / "config.json").is_file():
        raise HFError(f"no config.json in {rel!r} under {base} (a folder written by save_pretrained)")
    return path


def config(path: Path) -> Any:
    """The folder's config.json as transformers reads it (local files only: never the network)."""
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise HFError(f"cannot read {path.name}/config.json: {exc}") from exc


def resolve_card(card: ModelCard, base: Path) -> ModelCard:
    """The card with num_classes from config.json's num_labels and, where it leaves [labels] out, labels from
    its id2label. Raises CardError: the folder, transformers or the config missing, or a num_classes the
    card writes that is not the config's."""
    try:
        num_labels = int(config(folder(base, card.arch_name)).num_labels)
    except HFError as exc:
        raise CardError(card.name, str(exc)) from exc
    if "num_classes" in card.model_fields_set and card.num_classes != num_labels:
        raise CardError(card.name, f"num_classes = {card.num_classes}, but {card.arch_name}/config.json has "
                                   f"num_labels = {num_labels} (leave num_classes out to take the config's)")
    update: dict[str, Any] = {"num_classes": num_labels}
    if "labels" not in card.model_fields_set:
        update["labels"] = LabelsSpec(source="config")
    return card.model_copy(update=update)


def labels(path: Path) -> tuple[str, ...]:
    """Class names from config.json's id2label, in class order."""
    cfg = config(path)
    missing = [i for i in range(cfg.num_labels) if i not in cfg.id2label]
    if missing:
        raise HFError(f"{path.name}/config.json's id2label has no name for class {missing[0]} "
                      f"(num_labels = {cfg.num_labels})")
    return tuple(str(cfg.id2label[i]) for i in range(cfg.num_labels))


def pair(value: Any) -> tuple[int, int] | None:
    """An int, [h, w] or (h, w) as (h, w); None for anything else."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    return None


def _size(value: Any) -> tuple[int, int] | None:
    """An image processor's size: {height, width}, {shortest_edge} (a square: the image is resized whole) or
    an int."""
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value:
            return (int(value["shortest_edge"]),) * 2
        return None
    return pair(value)


def _triple(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, int | float):
        return (float(value),) * 3
    if isinstance(value, list | tuple) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def processor_values(processor: dict[str, Any]) -> dict[str, Any]:
    """PreprocessSpec fields from an image processor's settings (`to_dict()`, the keys of
    preprocessor_config.json); those it does not say are left out.

    The processor computes (p * rescale_factor - mean) / std from 8-bit values p; the service computes
    (p / 255 - mean') / std', so mean' = mean / (255 rescale_factor), std' = std / (255 rescale_factor): the
    same numbers for the usual factor 1/255 (without do_rescale the factor is 1). Without do_normalize:
    mean 0, std 1 before that scaling."""
    values: dict[str, Any] = {}
    crop = _size(processor.get("crop_size")) if processor.get("do_center_crop") else None
    size = crop or _size(processor.get("size"))
    if size is not None:
        values["input_size"] = size
    rescale = processor.get("do_rescale", True)
    factor = float(processor.get("rescale_factor", 1 / 255)) if rescale else 1.0
    scale = 255.0 * factor
    if math.isclose(scale, 1.0, rel_tol=1e-9):
        scale = 1.0  # 255 * (1/255) in floats: keep the processor's mean and std as written
    if processor.get("do_normalize", True):
        mean, std = _triple(processor.get("image_mean")), _triple(processor.get("image_std"))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if mean is not None and std is not None:
        values["mean"] = tuple(m / scale for m in mean)
        values["std"] = tuple(s / scale for s in std)
    # an int or PIL's IntEnum; adapters.derived_preprocess drops a value it cannot use
    resample = processor.get("resample")
    if isinstance(resample, int):
        values["interpolation"] = PIL_RESAMPLE.get(int(resample))
    elif isinstance(resample, str):
        values["interpolation"] = resample.lower()
    return values


def preprocess_values(path: Path) -> dict[str, Any]:
    """PreprocessSpec fields from the folder: config.json's image_size, then the image processor's values
    over it where the folder has one (AutoImageProcessor: its class's defaults fill what the file leaves
    out)."""
    values: dict[str, Any] = {}
    size = pair(getattr(config(path), "image_size", None))
    if size is not None:
        values["input_size"] = size
    if (path / "preprocessor_config.json").is_file():
        transformers = _transformers()
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HFError(f"cannot read {path.name}/preprocessor_config.json: {exc}") from exc
        values.update(processor_values(processor.to_dict()))
    return values


def checkpoint_names(model: Any) -> dict[str, str]:
    """The key save_pretrained writes for each of the model's state-dict keys, where it is a renaming
    (`model`: a transformers PreTrainedModel).

    transformers 5 renames some models' modules (ViT's encoder.layer.N.attention.attention.query is
    layers.N.attention.q_proj) but keeps their checkpoints in the original names, converting as it loads and
    saves (`revert_weight_conversion` is what save_pretrained applies); transformers 4 converts nothing. A
    conversion that changes tensors (splitting or fusing them) is not a renaming: its keys are left out, and
    the strict key check names them."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {k: k for k in state}
    reverted = revert_weight_conversion(model, dict(state))
    by_tensor = {id(t): k for k, t in state.items()}
    return {by_tensor[id(t)]: k for k, t in reverted.items() if id(t) in by_tensor}


class HFClassifier(nn.Module):
    """A transformers image classifier as the methods call it: forward(x) returns the (B, classes) logits.
    Its weights belong to `model` (`checkpoint_state`); its layer paths start with `model.`
    (model.vit.layers.1.layernorm_before)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict as save_pretrained wrote it, keyed as `model`'s own (a key it does not know stays as
        written, for the strict check to name)."""
        to_model = {saved: own for own, saved in checkpoint_names(self.model).items()}
        return {to_model.get(k, k): t for k, t in state.items()}


def build(path: Path, num_classes: int, **kwargs: Any) -> HFClassifier:
    """The folder's classifier with random weights (from its config alone). `num_classes` must be the
    config's (resolve_card makes a card's so); kwargs go to from_config (e.g. attn_implementation)."""
    transformers = _transformers()
    cfg = config(path)
    if cfg.num_labels != num_classes:
        raise HFError(f"{path.name}/config.json has num_labels = {cfg.num_labels}, not {num_classes}")
    try:
        model = transformers.AutoModelForImageClassification.from_config(cfg, **kwargs)
    except (ValueError, KeyError) as exc:
        raise HFError(f"transformers has no image classifier for {path.name}/config.json (model_type "
                      f"{getattr(cfg, 'model_type', '?')!r}): {exc}") from exc
    # float32 as the other models are served (a config saved from a half-precision model names its dtype);
    # the weights are cast as they are copied in
    return HFClassifier(model.float().eval())
