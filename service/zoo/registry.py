"""Build models from cards, load weights safely, and keep them in a registry by name."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInput, quote
from .adapters import Adapter, adapt, build, probe, resolve_preprocess
from .cards import CamSpec, CardError, ModelCard, Task, find_cards
from .fold import fold_batchnorms
from .hf import HFClassifier, HFError, resolve_card
from .labels import load_labels
from .preprocess import Preprocessor
from .reshape import ReshapeTransform, StageMaps, identity, swin_tokens
from .weights import WeightsMissing, apply_state_dict, read_state_dict, resolve_weights

log = logging.getLogger(__name__)

# Loaders of the cards of other tasks than classification, (card, models_dir, device) -> the loaded model,
# registered by the package that serves the task (service/detection/zoo.py: "detection"), as timm registers
# its models next to their definitions: the zoo reads cards and weights, and imports none of those packages.
TaskLoader = Callable[[ModelCard, Path, torch.device], Any]
TASK_LOADERS: dict[str, TaskLoader] = {}


def register_task_loader(task: str, loader: TaskLoader) -> None:
    TASK_LOADERS[task] = loader


@dataclass(eq=False)
class LoadedModel:
    card: ModelCard  # resolved: the derived preprocessing and Grad-CAM layer written in (load_model)
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
    task: Task = "classification"


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


def build_architecture(card: ModelCard, input_size: tuple[int, int] | None = None,
                       base: Path | None = None) -> nn.Module:
    """An untrained module of the card's architecture (weights come only from the card's file), built for
    `input_size` where the architecture fixes it at build (a timm ViT's or Swin's patch grid). `base`: the
    models directory an hf: folder is in."""
    try:
        return build(card.architecture, card.num_classes, input_size, base=base)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CardError(card.name, f"unknown architecture {card.architecture!r}: {exc}") from exc


def resolve_cam(card: ModelCard, adapter: Adapter) -> tuple[str, ReshapeTransform]:
    """The card's layer and reshape where it names them, the adapter's where it does not ("auto")."""
    layer = card.cam.target_layer or adapter.default_layer
    choice = card.cam.reshape
    if choice == "auto":
        return layer, adapter.reshape
    if choice == "none":
        return layer, identity
    if choice == "vit":
        if not adapter.tokens:
            raise CardError(card.name, f"cam.reshape 'vit' needs a model with patch tokens; "
                                       f"{card.architecture} has none (leave reshape out: 'auto')")
        return layer, adapter.reshape
    return layer, adapter.reshape if isinstance(adapter.reshape, StageMaps) else swin_tokens


def find_cam_layers(module: nn.Module, input_size: tuple[int, int],
                    reshape: ReshapeTransform) -> dict[str, tuple[int, ...]]:
    """Layers whose output (after the reshape transform) is a (C, h, w) map with more than one position: the
    ones Grad-CAM can use (at a 1 x 1 layer, such as global pooling, the map is one value and comes out all
    zeros)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for output in probe(module, input_size):
        try:
            mapped = reshape(output.tensor)
        except ValueError:
            continue
        if mapped.dim() == 4 and mapped.shape[-2] * mapped.shape[-1] > 1:
            shapes[output.name] = tuple(mapped.shape[1:])
    return shapes


def load_model(card: ModelCard, models_dir: Path, device: torch.device,
               fold_norms: bool = True) -> LoadedModel:
    """Build, load the weights, adapt (service/zoo/adapters.py) and fold. The LoadedModel's card is the card
    resolved: its preprocessing and Grad-CAM layer as derived where it left them out, so loading that card
    again gives the same model."""
    if card.family == "hf":  # its num_classes and labels are its config's (zoo/hf.py)
        card = resolve_card(card, models_dir)
    try:
        preprocess = resolve_preprocess(card.architecture, card.preprocess, models_dir)
    except HFError as exc:  # an image processor that cannot be read
        raise CardError(card.name, str(exc)) from exc
    size = preprocess.input_size
    module = build_architecture(card, size, models_dir)
    weights = resolve_weights(card.weights, models_dir, card.name)
    target, state = module, read_state_dict(weights, card.name)
    if isinstance(module, HFClassifier):  # the wrapped transformers model's, as save_pretrained named them
        target, state = module.model, module.checkpoint_state(state)
    apply_state_dict(target, state, card)
    card = card.model_copy(update={"preprocess": preprocess})
    return serve_module(card, module, device, load_labels(card, models_dir), fold_norms)


def serve_module(card: ModelCard, module: nn.Module, device: torch.device, labels: tuple[str, ...],
                 fold_norms: bool = True) -> LoadedModel:
    """A module with its weights in, made ready to serve: adapted (its Grad-CAM layer and reshape), folded
    and checked. `card.preprocess` is the resolved one (load_model; zoo/family_table.py builds its own)."""
    size = card.preprocess.input_size
    module.eval().requires_grad_(False).to(device)
    try:
        adapter = adapt(module, card.name, size)
    except ValueError as exc:
        raise CardError(card.name, str(exc)) from exc
    layer, reshape = resolve_cam(card, adapter)
    card = card.model_copy(update={"cam": CamSpec(target_layer=layer, reshape=card.cam.reshape)})
    folded = 0
    if fold_norms:
        probe = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        module, folded = fold_batchnorms(module, probe.to(device))
    # NHWC is the layout of cuDNN's and oneDNN's fastest convolution kernels (inputs are converted as they
    # enter the first convolution). On the CPU too the input-gradient methods and Grad-CAM run faster in it,
    # FullGrad about even (bench/memory_format.py; docs/benchmarks.md, section "Memory format").
    module.to(memory_format=torch.channels_last)
    layers = find_cam_layers(module, size, reshape)
    if layer not in layers:
        raise CardError(card.name, f"cam.target_layer {layer!r} is not a layer with a (C, h, w) output in "
                                   f"{card.architecture}{_why_not(module, layer, size, reshape, device)}")
    return LoadedModel(card=card, module=module, device=device, labels=labels,
                       preprocess=Preprocessor(card.preprocess), reshape=reshape, cam_layers=layers,
                       folded_norms=folded)


def _why_not(module: nn.Module, layer: str, size: tuple[int, int], reshape: ReshapeTransform,
             device: torch.device) -> str:
    """The reshape's own complaint about the layer's output (a token count that does not fit the grid), or
    '' when the layer does not exist or its output is simply not a map."""
    try:
        target = module.get_submodule(layer)
    except AttributeError:
        return ""
    seen: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: seen.append(out) if not seen else None)
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *size, device=device))
    finally:
        handle.remove()
    if not seen or not isinstance(seen[0], torch.Tensor):
        return ""
    try:
        reshape(seen[0])
    except ValueError as exc:
        return f": {exc}"
    return ""


@dataclass
class ModelRegistry:
    models: dict[str, LoadedModel] = field(default_factory=dict)  # the classifiers
    unavailable: dict[str, UnavailableModel] = field(default_factory=dict)
    # cards of task "detection": service.detection.zoo.LoadedDetector (loaded by the task's registered loader)
    detectors: dict[str, Any] = field(default_factory=dict)

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
                    if card.task != "classification":
                        loader = TASK_LOADERS.get(card.task)
                        if loader is None:
                            raise CardError(card.name, f"no loader for task {card.task!r} in this process "
                                                       "(service.detection registers the detectors')")
                        registry.detectors[card.name] = loader(card, found.base, device)
                        log.info("loaded detector %s on %s", card.name, device)
                        continue
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
            registry.unavailable[error.card] = UnavailableModel(error.card, arch, str(error),
                                                                card.task if card else "classification")
        return registry

    def get(self, name: str) -> LoadedModel:
        """A classifier by name; InvalidInput (422) for a detector, LookupError (404) for an unknown name."""
        if name in self.models:
            return self.models[name]
        if name in self.detectors:
            raise InvalidInput(f"model {quote(name)} is an object detector: the classifier methods do not "
                               "apply to it (its explanations are D-RISE and per-box maps)",
                               code="wrong_task")
        if name in self.unavailable:
            raise LookupError(f"model {quote(name)} is unavailable: {self.unavailable[name].reason}")
        raise LookupError(f"unknown model {quote(name)}; available: {sorted(self.models)}")
