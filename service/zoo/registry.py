"""Build models from cards, load weights safely, and keep them in a registry by name."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import quote
from .cards import CardError, ModelCard, find_cards
from .fold import fold_batchnorms
from .labels import load_labels
from .preprocess import Preprocessor
from .reshape import RESHAPES, ReshapeTransform
from .tiny import BUILTIN
from .weights import WeightsMissing, apply_state_dict, read_state_dict, resolve_weights

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    card: ModelCard
    module: nn.Module
    device: torch.device
    labels: tuple[str, ...]
    preprocess: Preprocessor
    reshape: ReshapeTransform
    cam_layers: dict[str, tuple[int, ...]]  # module path -> activation shape (C, h, w) after the reshape
    folded_norms: int = 0  # BatchNorms folded into their convolutions at load (zoo/fold.py)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        return self.preprocess.size

    def explainee(self, max_batch: int = 64, pass_sizes: tuple[int, ...] = ()):
        from ..methods.base import Explainee

        return Explainee(module=self.module, normalize=self.preprocess.normalize,
                         cam_layer=self.card.cam.target_layer, reshape=self.reshape, max_batch=max_batch,
                         pass_sizes=pass_sizes)


@dataclass(frozen=True)
class UnavailableModel:
    card_name: str
    architecture: str
    reason: str


def resolve_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def set_cudnn_autotuning(enabled: bool) -> None:
    """cuDNN's benchmark mode: it times every kernel for each new input shape and keeps the fastest. That
    pays for fixed shapes (the benchmarks), not for a batching server, whose pass sizes change with the load
    and the method (1-32 requests, IG passes of n_steps x images cut to the pass batch), so each new size
    stalls the worker while it is timed (docs/benchmarks.md, section "GPU", its "Service under load").
    Process-wide."""
    torch.backends.cudnn.benchmark = enabled


def build_architecture(card: ModelCard) -> nn.Module:
    """An untrained module of the card's architecture (weights come only from the card's file)."""
    try:
        if card.family == "timm":
            import timm

            return timm.create_model(card.arch_name, pretrained=False, num_classes=card.num_classes)
        if card.family == "torchvision":
            import torchvision

            return torchvision.models.get_model(card.arch_name, weights=None, num_classes=card.num_classes)
        return BUILTIN[card.arch_name](num_classes=card.num_classes)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CardError(card.name, f"unknown architecture {card.architecture!r}: {exc}") from exc


def find_cam_layers(module: nn.Module, input_size: tuple[int, int], reshape: ReshapeTransform,
                    device: torch.device) -> dict[str, tuple[int, ...]]:
    """Layers whose output (after the reshape transform) is a (C, h, w) map with more than one position: the
    ones Grad-CAM can use (at a 1 x 1 layer, such as global pooling, the map is one value and comes out all
    zeros)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and name:
                try:
                    mapped = reshape(output)
                except ValueError:
                    return
                if mapped.dim() == 4 and mapped.shape[-2] * mapped.shape[-1] > 1:
                    shapes[name] = tuple(mapped.shape[1:])
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in module.named_modules()]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def load_model(card: ModelCard, models_dir: Path, device: torch.device,
               fold_norms: bool = True) -> LoadedModel:
    module = build_architecture(card)
    weights = resolve_weights(card.weights, models_dir, card.name)
    apply_state_dict(module, read_state_dict(weights, card.name), card)
    module.eval().requires_grad_(False).to(device)
    folded = 0
    if fold_norms:
        probe = torch.randn(2, 3, *card.preprocess.input_size, generator=torch.Generator().manual_seed(0))
        module, folded = fold_batchnorms(module, probe.to(device))
    # NHWC is the layout of cuDNN's and oneDNN's fastest convolution kernels (inputs are converted as they
    # enter the first convolution). On the CPU too the input-gradient methods and Grad-CAM run faster in it,
    # FullGrad about even (bench/memory_format.py; docs/benchmarks.md, section "Memory format").
    module.to(memory_format=torch.channels_last)
    reshape = RESHAPES[card.cam.reshape]
    layers = find_cam_layers(module, card.preprocess.input_size, reshape, device)
    if card.cam.target_layer not in layers:
        raise CardError(card.name, f"cam.target_layer {card.cam.target_layer!r} is not a layer with a "
                                   f"(C, h, w) output in {card.architecture}")
    return LoadedModel(card=card, module=module, device=device, labels=load_labels(card, models_dir),
                       preprocess=Preprocessor(card.preprocess), reshape=reshape, cam_layers=layers,
                       folded_norms=folded)


@dataclass
class ModelRegistry:
    models: dict[str, LoadedModel] = field(default_factory=dict)
    unavailable: dict[str, UnavailableModel] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, models_dir: Path | Sequence[Path], device: torch.device, only: set[str] | None = None,
                 fold_norms: bool = True) -> ModelRegistry:
        """Load every card of a models directory, or of several (Settings.card_dirs: a later directory's card
        replaces an earlier one's of the same name); a card that fails is listed as unavailable with its
        reason, never served random."""
        registry = cls()
        for found in find_cards([models_dir] if isinstance(models_dir, Path) else models_dir):
            card, error = found.card, found.error
            if card is not None:
                if only is not None and card.name not in only:
                    continue
                try:
                    registry.models[card.name] = load_model(card, found.base, device, fold_norms)
                    log.info("loaded model %s on %s (%d BatchNorms folded)", card.name, device,
                             registry.models[card.name].folded_norms)
                    continue
                except CardError as exc:
                    error = exc
            assert error is not None  # a card that was not read has its error
            if not isinstance(error, WeightsMissing):
                log.error("%s", error)
            arch = card.architecture if card else "?"
            registry.unavailable[error.card] = UnavailableModel(error.card, arch, str(error))
        return registry

    def get(self, name: str) -> LoadedModel:
        if name in self.models:
            return self.models[name]
        if name in self.unavailable:
            raise LookupError(f"model {quote(name)} is unavailable: {self.unavailable[name].reason}")
        raise LookupError(f"unknown model {quote(name)}; available: {sorted(self.models)}")
