"""Zero-configuration adapters: a model's default Grad-CAM layer, reshape transform and preprocessing, read
from the model itself, so a card needs only an architecture and weights.

What is read, and from where:
- Preprocessing (`derived_preprocess`), from the architecture's name, before the model is built: a ViT's
  patch grid is fixed when it is built, so the input size must be known first. timm: its pretrained config
  (`timm.models.get_pretrained_cfg`: input_size, mean, std, interpolation; offline metadata, no weights).
  torchvision: its default weights' transforms (crop size, interpolation; ImageNet mean and std). Builtin:
  `PreprocessSpec`'s defaults. hf: the saved folder's image processor (service/zoo/hf.py). The image is
  still resized whole, not cropped (cards.PreprocessSpec.resize).
- Layer and reshape (`adapt`), from the built module. Rules are tried in order, each registered with
  `register_adapter` next to the family it serves, as timm registers its models:
  * "vit" (timm's VisionTransformer, DeiT distilled, Eva, ...: any module with `num_prefix_tokens`,
    `patch_embed` and `blocks`): the layer is the last block's `norm1` (pytorch-grad-cam's choice: the head
    reads the class token, which only mixes in the patch tokens through the last attention, so the last
    block's output has no gradient at the patches); tokens reshaped with the model's prefix count (class,
    distillation, register tokens) on its patch grid (`patch_embed.grid_size`, or the grid of the input
    size with `dynamic_img_size`).
  * "torchvision-vit": the same for torchvision's VisionTransformer (one class token, square grid).
  * "hf-vit": the same for transformers' ViT and DeiT (wrapped in hf.HFClassifier: `embeddings` with
    `patch_embeddings`, and `layers`, or `encoder.layer` before transformers 5): the last layer's
    `layernorm_before`, as a path of the wrapper (model.vit.layers.1.layernorm_before); the prefix is the
    embeddings' class, distillation and register tokens, the grid the config's image_size over its
    patch_size (non-square too).
  * "hf-stages": transformers' CNNs with `encoder.stages` (ResNet, ConvNeXt, RegNet, ...): the layer the
    head pools; `StageMaps` over the stages' channels-first outputs where a layer inside them is
    channels-last (ConvNeXt's block internals), no reshape otherwise.
  * "stages" (timm models with channels-last maps: Swin's stages, ConvNeXt's block internals; torchvision's
    Swin and ConvNeXt): the layer the head pools (below); `StageMaps` over the stage shapes read in a probe
    forward (timm: the `feature_info` modules, whose `num_chs` tells the layout; torchvision: the children
    of `features`).
  * "cnn" (everything else: timm and torchvision CNNs, builtin models): the layer the head pools; no reshape.
- "The layer the head pools" (`pooled_layer`): one probe forward at the input size; the last module to
  produce a spatial (more than 1 x 1) 4-D map is the one the global pooling reads. Grad-CAM's reference layer
  is the last conv block after its activation and before pooling (the official code's relu5_3 for VGG-16),
  and this finds it from the structure alone: torchvision ResNet's layer4, EfficientNet's features,
  DenseNet's features (timm: features.norm5), timm EfficientNet's bn2 (conv_head's BatchNorm and
  activation), Swin's final norm. Of the modules that return that same tensor (layer4.1, layer4), the one
  timm's `feature_info[-1]` names is taken when it is among them, else the outermost; modules that hand
  their input through (Identity) are skipped. These derived layers are the ones the shipped cards name by
  hand (efficientnet_lite0: bn2, resnet50: layer4, tiny_cnn: head; tests/test_adapters.py).

`FAMILIES` lists the families tested (tests/test_adapters.py), each with the architecture and the tiny
configuration used; `family_facts()` builds each with random weights and returns what the adapter derives
(default layer, reshape, layer grid at a square and a non-square input): the rows of the README's table.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hf
from .cards import PreprocessSpec
from .reshape import ReshapeTransform, StageMaps, Tokens, describe, identity
from .tiny import BUILTIN

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


# ---------------------------------------------------------------------------------------------- preprocess

def derived_preprocess(architecture: str, base: Path | None = None) -> PreprocessSpec:
    """The preprocessing the architecture was trained with, as far as its library says, without building it
    or reading weights; PreprocessSpec's defaults for what it does not say. `base`: the models directory an
    hf: folder is in (hf.HFError when it cannot be read)."""
    library, _, name = architecture.partition(":")
    values: dict[str, Any] = {}
    if library == "timm":
        import timm.models

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None:
            values = {"input_size": tuple(cfg.input_size[1:]), "mean": tuple(cfg.mean), "std": tuple(cfg.std),
                      "interpolation": cfg.interpolation}
    elif library == "torchvision":
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            weights = None
        keywords = getattr(getattr(weights, "transforms", None), "keywords", {})
        crop = keywords.get("crop_size", 224)
        interpolation = keywords.get("interpolation")
        values = {"input_size": (crop, crop), **IMAGENET,
                  "interpolation": getattr(interpolation, "value", "bilinear")}
        values.update({k: tuple(keywords[k]) for k in ("mean", "std") if k in keywords})
    elif library == "hf":
        values = hf.preprocess_values(hf.folder(_base(base, architecture), name))
    if values.get("interpolation") not in INTERPOLATIONS:  # timm's '' or 'random': the nearest usual one
        values.pop("interpolation", None)
    return PreprocessSpec(**values)


def resolve_preprocess(architecture: str, card_spec: PreprocessSpec,
                       base: Path | None = None) -> PreprocessSpec:
    """The derived preprocessing with each field the card writes (its `model_fields_set`) put over it."""
    derived = derived_preprocess(architecture, base)
    return derived.model_copy(update={f: getattr(card_spec, f) for f in card_spec.model_fields_set})


# ---------------------------------------------------------------------------------------------------- build

def fixed_input_size(architecture: str) -> bool:
    """Whether the model is built for one input size: timm's pretrained config says so of its ViTs, Swins
    and other patch-grid models (`fixed_input_size`); its CNNs and torchvision's models take any size."""
    library, _, name = architecture.partition(":")
    if library != "timm":
        return False
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def _base(base: Path | None, architecture: str) -> Path:
    if base is None:
        raise ValueError(f"{architecture}: an hf: folder needs the models directory it is in")
    return base


def build(architecture: str, num_classes: int, input_size: tuple[int, int] | None = None, *,
          base: Path | None = None, **kwargs: Any) -> nn.Module:
    """An untrained module of `architecture` ("timm:NAME", "torchvision:NAME", "builtin:NAME", "hf:DIR" with
    DIR in `base`).

    A timm model of a fixed input size (ViT, Swin, ...) is built for `input_size` (`img_size=(H, W)`,
    non-square allowed); the others take any size. torchvision's VisionTransformer is built for its default
    size (square only); the ViT adapter says so when the input differs; an hf: model for its config's.
    Raises KeyError, ValueError, RuntimeError or TypeError for an unknown name or arguments the architecture
    does not take."""
    library, _, name = architecture.partition(":")
    if library == "timm":
        import timm

        if input_size is not None and fixed_input_size(architecture):
            kwargs.setdefault("img_size", tuple(input_size))
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if library == "builtin":
        return BUILTIN[name](num_classes=num_classes, **kwargs)
    if library == "hf":
        return hf.build(hf.folder(_base(base, architecture), name), num_classes, **kwargs)
    raise ValueError(f"unknown library {library!r} (timm, torchvision, builtin or hf)")


# ---------------------------------------------------------------------------------------------------- probe

@dataclass(frozen=True)
class Output:
    name: str
    tensor: torch.Tensor
    passthrough: bool  # the module returned one of its inputs (Identity)


def probe(module: nn.Module, input_size: tuple[int, int]) -> list[Output]:
    """Every submodule's tensor output in one forward at `input_size`, in the order the modules finish (a
    container after its children)."""
    outputs: list[Output] = []

    def record(name: str):
        def hook(_m, inputs, output):
            if isinstance(output, torch.Tensor):
                outputs.append(Output(name, output, any(output is i for i in inputs)))
        return hook

    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    handles = [m.register_forward_hook(record(n)) for n, m in module.named_modules() if n]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _spatial(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.shape[1] * t.shape[2] > 1 and t.shape[2] * t.shape[3] > 1


def pooled_layer(outputs: list[Output], preferred: str | None = None) -> str:
    """The layer whose output the head pools: the last spatial 4-D map of the forward; of the modules that
    return that very tensor, `preferred` (timm's feature_info[-1] module) if it is one of them, else the
    outermost (the last to finish)."""
    maps = [o for o in outputs if _spatial(o.tensor) and not o.passthrough]
    if not maps:
        raise ValueError("no layer produces a spatial (C, h, w) map")
    pooled = maps[-1].tensor
    names = [o.name for o in maps if o.tensor is pooled]
    return preferred if preferred in names else names[-1]


def _feature_info(module: nn.Module) -> list[dict[str, Any]]:
    info = getattr(module, "feature_info", None)
    if not isinstance(info, list) or not all(isinstance(i, dict) for i in info):
        return []
    return [dict(i) for i in info]


# -------------------------------------------------------------------------------------------------- adapters

@dataclass(frozen=True)
class Adapter:
    """What Grad-CAM needs of a model: the default layer and the transform of its activations."""

    rule: str  # the registered rule that matched
    default_layer: str
    reshape: ReshapeTransform = identity
    tokens: bool = field(default=False)  # the reshape lays patch tokens on a grid (card reshape "vit")

    @property
    def reshape_description(self) -> str:
        return describe(self.reshape)


Rule = Callable[[nn.Module, str, tuple[int, int]], Adapter]
ADAPTERS: list[tuple[str, Callable[[nn.Module], bool], Rule]] = []


def register_adapter(name: str, matches: Callable[[nn.Module], bool]) -> Callable[[Rule], Rule]:
    """Add a rule, tried after those registered before it; the last one ("cnn") matches everything."""
    def decorate(rule: Rule) -> Rule:
        ADAPTERS.append((name, matches, rule))
        return rule
    return decorate


def adapt(module: nn.Module, model: str, input_size: tuple[int, int]) -> Adapter:
    """The first registered rule that matches the module, applied at `input_size`. `model` names the model
    in errors. Raises ValueError when the model's facts and the input size disagree."""
    for _name, matches, rule in ADAPTERS:
        if matches(module):
            return rule(module, model, input_size)
    raise AssertionError("the 'cnn' rule matches every module")


def _is_timm_tokens(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("num_prefix_tokens", "patch_embed", "blocks"))


@register_adapter("vit", _is_timm_tokens)
def _timm_tokens(module: nn.Module, model: str, input_size: tuple[int, int]) -> Adapter:
    embed: Any = module.patch_embed
    size = tuple(input_size)
    if getattr(module, "dynamic_img_size", False):
        grid = tuple(embed.dynamic_feat_size(size))
    else:
        grid = tuple(embed.grid_size)
        built = tuple(embed.img_size) if embed.img_size is not None else None
        if built is not None and built != size:
            raise ValueError(f"model {model!r}: built for {built[0]}x{built[1]} inputs ({grid[0]}x{grid[1]} "
                             f"patches), asked for {size[0]}x{size[1]}")
    blocks: Any = module.blocks
    last = f"blocks.{len(blocks) - 1}"
    layer = f"{last}.norm1" if hasattr(blocks[-1], "norm1") else last
    prefix = int(module.num_prefix_tokens)  # type: ignore[arg-type]
    return Adapter("vit", layer, Tokens(model, prefix, (grid[0], grid[1])), tokens=True)


def _is_torchvision(m: nn.Module, cls: str) -> bool:
    import torchvision

    return isinstance(m, getattr(torchvision.models, cls))


@register_adapter("torchvision-vit", lambda m: _is_torchvision(m, "VisionTransformer"))
def _torchvision_tokens(module: nn.Module, model: str, input_size: tuple[int, int]) -> Adapter:
    side, patch = int(module.image_size), int(module.patch_size)  # type: ignore[arg-type]
    if tuple(input_size) != (side, side):
        raise ValueError(f"model {model!r}: torchvision's VisionTransformer takes {side}x{side} inputs only, "
                         f"asked for {input_size[0]}x{input_size[1]}")
    layers: Any = module.encoder.layers  # type: ignore[union-attr]
    layer = f"encoder.layers.{list(dict(layers.named_children()))[-1]}.ln_1"
    return Adapter("torchvision-vit", layer, Tokens(model, 1, (side // patch, side // patch)), tokens=True)


def _stage_shapes(outputs: list[Output], names: dict[str, str]) -> set[tuple[int, int, int]]:
    """(C, h, w) of the named modules' outputs; `names` maps a module to its layout, "NCHW" or "NHWC"."""
    shapes = set()
    for o in outputs:
        layout = names.get(o.name)
        if layout is not None and o.tensor.dim() == 4:
            _, a, b, c = o.tensor.shape
            shapes.add((a, b, c) if layout == "NCHW" else (c, a, b))
    return shapes


def _channels_last_inside(outputs: list[Output], stages: set[tuple[int, int, int]]) -> bool:
    """Some layer's output is a stage map laid out channels-last."""
    for o in outputs:
        if o.tensor.dim() == 4:
            _, a, b, c = o.tensor.shape
            if (c, a, b) in stages and (a, b, c) not in stages:
                return True
    return False


@register_adapter("timm-stages", lambda m: bool(_feature_info(m)))
def _timm_stages(module: nn.Module, model: str, input_size: tuple[int, int]) -> Adapter:
    """timm models with feature_info: the stages' layouts from num_chs; StageMaps where any layer is
    channels-last (Swin, ConvNeXt), no reshape otherwise (CNNs: as a card without reshape always had)."""
    info = _feature_info(module)
    outputs = probe(module, input_size)
    layouts = {}
    for o in outputs:
        chs = next((i["num_chs"] for i in info if i["module"] == o.name), None)
        if chs is not None and o.tensor.dim() == 4:
            layouts[o.name] = "NCHW" if o.tensor.shape[1] == chs else "NHWC"
    stages = _stage_shapes(outputs, layouts)
    layer = pooled_layer(outputs, preferred=info[-1]["module"])
    if _channels_last_inside(outputs, stages):
        return Adapter("stages", layer, StageMaps(model, frozenset(stages)))
    return Adapter("cnn", layer)


def _torchvision_stage_rule(layout: str) -> Rule:
    def rule(module: nn.Module, model: str, input_size: tuple[int, int]) -> Adapter:
        outputs = probe(module, input_size)
        children = {f"features.{n}": layout for n, _ in module.features.named_children()}  # type: ignore
        stages = _stage_shapes(outputs, children)
        return Adapter("stages", pooled_layer(outputs), StageMaps(model, frozenset(stages)))
    return rule


register_adapter("torchvision-swin", lambda m: _is_torchvision(m, "SwinTransformer"))(
    _torchvision_stage_rule("NHWC"))
register_adapter("torchvision-convnext", lambda m: _is_torchvision(m, "ConvNeXt"))(
    _torchvision_stage_rule("NCHW"))


def _paths(module: nn.Module) -> dict[int, str]:
    """Each submodule's path in `module` (the served one: an hf.HFClassifier's start with `model.`)."""
    return {id(m): name for name, m in module.named_modules()}


def _hf_base(m: nn.Module) -> Any:
    """The base model (embeddings, encoder) of a transformers classifier as served, or None."""
    return m.model.base_model if isinstance(m, hf.HFClassifier) else None


def _hf_token_layers(m: nn.Module) -> Any:
    """A transformers ViT's layers (`layers` in transformers 5, `encoder.layer` in 4), or None."""
    base = _hf_base(m)
    if not hasattr(getattr(base, "embeddings", None), "patch_embeddings"):
        return None
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = getattr(getattr(base, "encoder", None), "layer", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


@register_adapter("hf-vit", lambda m: _hf_token_layers(m) is not None)
def _hf_tokens(module: nn.Module, model: str, input_size: tuple[int, int]) -> Adapter:
    """As "vit": the classifier reads the class token after the final layernorm, so the last layer's output
    has no gradient at the patches; its `layernorm_before` (norm1 in DINOv2) does."""
    base = _hf_base(module)
    config, embeddings = base.config, base.embeddings
    built, patch = hf.pair(config.image_size), hf.pair(config.patch_size)
    if built is None or patch is None:
        raise ValueError(f"model {model!r}: config image_size {config.image_size!r} and patch_size "
                         f"{config.patch_size!r} give no patch grid")
    grid = (built[0] // patch[0], built[1] // patch[1])
    if tuple(input_size) != built:
        raise ValueError(f"model {model!r}: built for {built[0]}x{built[1]} inputs ({grid[0]}x{grid[1]} "
                         f"patches, config.json's image_size), asked for {input_size[0]}x{input_size[1]}")
    # class, distillation (DeiT) and register tokens, each a (1, n, C) parameter of the embeddings
    prefix = sum(int(t.shape[1]) for t in (getattr(embeddings, a, None) for a in
                                           ("cls_token", "distillation_token", "register_tokens"))
                 if isinstance(t, torch.Tensor))
    last = _hf_token_layers(module)[-1]
    norm = next((getattr(last, a) for a in ("layernorm_before", "norm1") if hasattr(last, a)), last)
    return Adapter("hf-vit", _paths(module)[id(norm)], Tokens(model, prefix, grid), tokens=True)


def _hf_stage_paths(m: nn.Module) -> list[str]:
    stages = getattr(getattr(_hf_base(m), "encoder", None), "stages", None)
    if not isinstance(stages, nn.ModuleList):
        return []
    paths = _paths(m)
    return [paths[id(s)] for s in stages]


@register_adapter("hf-stages", lambda m: bool(_hf_stage_paths(m)))
def _hf_stages(module: nn.Module, model: str, input_size: tuple[int, int]) -> Adapter:
    outputs = probe(module, input_size)
    stages = _stage_shapes(outputs, dict.fromkeys(_hf_stage_paths(module), "NCHW"))
    layer = pooled_layer(outputs)
    if _channels_last_inside(outputs, stages):
        return Adapter("stages", layer, StageMaps(model, frozenset(stages)))
    return Adapter("cnn", layer)


@register_adapter("cnn", lambda m: True)
def _cnn(module: nn.Module, model: str, input_size: tuple[int, int]) -> Adapter:
    return Adapter("cnn", pooled_layer(probe(module, input_size)))


# --------------------------------------------------------------------------------------------- the families

@dataclass(frozen=True)
class Family:
    """One family of the tested list: the architecture and the tiny configuration built for the tests (random
    weights; fewer blocks and narrower where timm's arguments allow, so the list builds in seconds)."""

    family: str
    architecture: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, input_size: tuple[int, int], num_classes: int = 10) -> nn.Module:
        return build(self.architecture, num_classes, input_size, **self.kwargs).eval().requires_grad_(False)


_SWIN = {"depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 1, 1, 1)}
FAMILIES: tuple[Family, ...] = (
    Family("ViT", "timm:vit_tiny_patch16_224", {"depth": 2}),
    Family("DeiT distilled", "timm:deit_tiny_distilled_patch16_224", {"depth": 2}),
    Family("ViT with registers", "timm:vit_small_patch14_reg4_dinov2", {"depth": 2, "embed_dim": 64,
                                                                         "num_heads": 2}),
    Family("Swin", "timm:swin_tiny_patch4_window7_224", _SWIN),
    Family("ConvNeXt", "timm:convnext_atto", {"conv_mlp": False}),  # channels-last MLPs, as the larger ones
    Family("EfficientNet", "timm:efficientnet_b0"),
    Family("ResNet", "timm:resnet18"),
    Family("MobileNetV3", "timm:mobilenetv3_small_050"),
    Family("RegNet", "timm:regnetx_002"),
    Family("DenseNet", "timm:densenet121"),
    Family("ResNet", "torchvision:resnet18"),
    Family("MobileNetV3", "torchvision:mobilenet_v3_small"),
    Family("RegNet", "torchvision:regnet_x_400mf"),
    Family("DenseNet", "torchvision:densenet121"),
    Family("EfficientNet", "torchvision:efficientnet_b0"),
    Family("ConvNeXt", "torchvision:convnext_tiny"),
    Family("Swin", "torchvision:swin_t"),
)
SQUARE, NON_SQUARE = (64, 64), (64, 96)


@dataclass(frozen=True)
class FamilyFacts:
    family: str
    architecture: str
    rule: str
    default_layer: str
    reshape: str
    grids: dict[tuple[int, int], tuple[int, int]]  # input (H, W) -> the default layer's map (h, w)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def family_facts(families: tuple[Family, ...] = FAMILIES,
                 sizes: tuple[tuple[int, int], ...] = (SQUARE, NON_SQUARE)) -> list[FamilyFacts]:
    """What the adapter derives for each family, built with random weights at each input size."""
    rows = []
    for fam in families:
        grids: dict[tuple[int, int], tuple[int, int]] = {}
        adapter = None
        for size in sizes:
            with _seeded(0):
                module = fam.build(size)
            adapter = adapt(module, fam.architecture, size)
            out = next(o.tensor for o in probe(module, size) if o.name == adapter.default_layer)
            grids[size] = (int(adapter.reshape(out).shape[-2]), int(adapter.reshape(out).shape[-1]))
        assert adapter is not None
        rows.append(FamilyFacts(fam.family, fam.architecture, adapter.rule, adapter.default_layer,
                                adapter.reshape_description, grids))
    return rows
