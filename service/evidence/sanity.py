"""Per-model sanity report: does a method's map depend on the model, and on the class it explains?

Two checks (methods-reference section 9):
- Cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency Maps"):
  re-initialise the model's parameters from the logits layer down to the first layer, one block at a time
  (cumulative: level i has levels 0..i randomised), recompute each map for the class the ORIGINAL model
  predicted, and compare it with the original map by Spearman rank correlation. A map that keeps its ranks
  after every layer is random explains the image (its edges, its contrast), not the model.
- The random-logit check (Sixt et al. 2020; Quantus' RandomLogit): the map for a random other class must
  differ from the map for the predicted one.

`sanity_report` runs both for a list of methods on one model and a batch of images (the shipped photos:
`shipped_photos`) and gives each method a verdict. The served model is never touched: the randomised model is
a copy. bench/sanity.py prints the report for a model card; docs/sanity.md reads one.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..engine import explain
from ..errors import InvalidInput
from ..methods import Method, MethodParams, Progress
from ..zoo import LoadedModel
from .ranks import rankdata, spearman  # noqa: F401 - re-exported: tests and bench use them here

PHOTOS = Path(__file__).resolve().parent / "photos"

# Verdict thresholds, on the mean over images of the Spearman rank correlation of two maps. The paper sets
# none (it judges by its curves and by eye); these are placed between what it and our runs show on each side.
# - RANDOMISED_LIMIT: a map that still correlates at >= 0.5 with the original once EVERY layer is random
#   fails. In Adebayo et al.'s cascading randomisation (Inception v3, ImageNet) Guided BackProp and Guided
#   Grad-CAM stay close to their original maps down to the first layers, the gradient, SmoothGrad and
#   Grad-CAM decorrelate, and gradient x input and IG keep part of the image's structure. Measured here
#   (docs/sanity.md: EfficientNet-Lite0, the 4 shipped photos, seed 0): Grad-CAM 0.00, the gradient 0.10,
#   SmoothGrad and MoreauGrad 0.16, Integrated Gradients 0.45 (the paper's "partly the input": the closest
#   to the line), FullGrad 0.67 (fails: its maps share a spatial pattern across images, `cross_image`), and
#   a Sobel edge map that ignores the model 1.00 (tests/test_evidence_sanity.py).
# - CLASS_LIMIT: a map for a random other class that correlates at >= 0.9 with the top class's is "not
#   class-discriminative". Input-gradient maps of two classes share the image's structure and correlate well
#   above 0 (measured: Grad-CAM 0.13, SmoothGrad and MoreauGrad 0.43-0.44, the gradient 0.51, IG 0.63), so
#   the bar is high: it catches maps that are (nearly) the same whatever the class (FullGrad 0.94, the Sobel
#   map 1.00).
RANDOMISED_LIMIT = 0.5
CLASS_LIMIT = 0.9

# The report's parameter profiles. "quick" (the service's default and bench/sanity.py's): the iterative
# methods at a fraction of their defaults, so a report of every method costs a few hundred method runs' worth
# of passes, minutes on a CPU; every other parameter at its default. "full": every method at its defaults
# (MoreauGrad's 200 x 32 makes that hours on a CPU).
PROFILES = ("quick", "full")
QUICK = {"n_steps": 16, "n_samples": 8, "iterations": 10}
QUICK_MOREAU_SAMPLES = 4  # a method with both iterations and n_samples (MoreauGrad): iterations x 4

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def profile_params(method: Method, profile: str = "quick") -> MethodParams:
    """The parameters a sanity report of `profile` (PROFILES) runs `method` with."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    if profile == "full":
        return method.Params()
    fields = method.Params.model_fields
    changes: dict[str, Any] = {k: v for k, v in QUICK.items() if k in fields}
    if "iterations" in fields and "n_samples" in fields:
        changes["n_samples"] = QUICK_MOREAU_SAMPLES
    return method.Params(**changes)


def shipped_photos() -> list[Image.Image]:
    """The four photos that ship with the service (service/evidence/photos, public domain / CC0, from
    scikit-image's sample data; see the README there), in name order: astronaut, chelsea, coffee, rocket."""
    photos = []
    for path in sorted(PHOTOS.glob("*.jpg")):
        with Image.open(path) as image:
            photos.append(image.convert("RGB"))
    return photos


# ---------------------------------------------------------------------------------------------------------
# Spearman rank correlation


def _mean_spearman(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(spearman(x, y) for x, y in zip(a, b, strict=True)) / len(a)


def _cross_image(maps: list[torch.Tensor]) -> float | None:
    """The mean rank correlation of the maps of different images (None for one image): high when a method's
    maps share a pattern whatever the image."""
    pairs = [(a, b) for i, a in enumerate(maps) for b in maps[i + 1:] if a.shape == b.shape]
    return sum(spearman(a, b) for a, b in pairs) / len(pairs) if pairs else None


def _constant(maps: list[torch.Tensor]) -> int:
    return sum(bool(m.max() == m.min()) for m in maps)


# ---------------------------------------------------------------------------------------------------------
# Cascade levels


@dataclasses.dataclass(frozen=True)
class Level:
    blocks: list[str]  # the blocks this level randomises (e.g. ["blocks.6"], ["conv_head", "bn2"])
    modules: list[str]  # the modules in them that hold parameters (what `randomise` re-initialises)


def _has_parameters(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _has_weight_layer(m: nn.Module) -> bool:
    """Holds a parameter of 2 or more dims: a conv's or linear's weight (a norm's are 1-D)."""
    return any(p.dim() >= 2 for p in m.parameters())


def _root(module: nn.Module) -> tuple[str, nn.Module]:
    """The module whose children are the blocks: the module itself, or the one model a wrapper holds (a
    module without parameters of its own and a single child that has some)."""
    prefix, root = "", module
    while not any(True for _ in root.parameters(recurse=False)):
        children = [(n, c) for n, c in root.named_children() if _has_parameters(c)]
        if len(children) != 1:
            break
        name, root = children[0]
        prefix = f"{prefix}{name}."
    return prefix, root


def _units(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The top-level children with parameters; a container of several blocks with weights (timm's
    `blocks`, torchvision's `layer1`..`layer4`) is replaced by its children."""
    units = []
    for name, child in root.named_children():
        if not _has_parameters(child):
            continue
        if isinstance(child, _CONTAINERS) and sum(_has_weight_layer(c) for c in child.children()) >= 2:
            units += [(f"{name}.{n}", c) for n, c in child.named_children() if _has_parameters(c)]
        else:
            units.append((name, child))
    return units


def _default_probe(module: nn.Module) -> torch.Tensor:
    p = next(module.parameters())
    return torch.zeros(1, 3, 224, 224, device=p.device, dtype=p.dtype)


def cascade_blocks(module: nn.Module, probe: torch.Tensor | None = None) -> list[Level]:
    """The randomisation levels of `module`, from the logits layer down to the first layer.

    The blocks are the top-level children (containers of blocks expanded), ordered by their first use in a
    forward pass of `probe` (default: one 224 x 224 zero image), then reversed. A block with a weight layer
    (a parameter of 2+ dims) starts a level; a block with only 1-D parameters (a BatchNorm after its conv)
    joins the level of the block used before it; blocks with no parameters, and blocks the forward pass does
    not use, are not levels. Parameters the root holds itself (e.g. a ViT's position embedding) go with the
    first layer."""
    prefix, root = _root(module)
    units = _units(root)
    first_use: dict[str, int] = {}

    def record(name: str):
        def hook(_m, _inputs):
            first_use.setdefault(name, len(first_use))
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in units]
    try:
        with torch.no_grad():
            module(probe if probe is not None else _default_probe(module))
    finally:
        for handle in handles:
            handle.remove()
    used = sorted((u for u in units if u[0] in first_use), key=lambda u: first_use[u[0]])
    forward: list[list[tuple[str, nn.Module]]] = []
    for name, m in used:
        if _has_weight_layer(m) or not forward:
            forward.append([(name, m)])
        else:
            forward[-1].append((name, m))
    levels = []
    for group in reversed(forward):
        names = [f"{prefix}{unit}.{sub}" if sub else f"{prefix}{unit}"
                 for unit, m in group for sub, inner in m.named_modules()
                 if any(True for _ in inner.parameters(recurse=False))]
        levels.append(Level([f"{prefix}{unit}" for unit, _ in group], names))
    if levels and any(True for _ in root.parameters(recurse=False)):
        levels[-1].modules.append(prefix.rstrip("."))
    return levels


def cascade_levels(module: nn.Module, probe: torch.Tensor | None = None) -> list[list[str]]:
    """Per level, from the logits layer down to the first layer, the names of the modules holding
    parameters that it randomises (cumulative: level i randomises levels 0..i). For timm's EfficientNet:
    classifier, conv_head (+ bn2 unless folded), blocks.6, ..., blocks.0, conv_stem (+ bn1 unless folded).
    See `cascade_blocks` for the rule."""
    return [level.modules for level in cascade_blocks(module, probe)]


# ---------------------------------------------------------------------------------------------------------
# Randomisation


def _reset_with_seed(m: nn.Module, seed: int) -> None:
    """m.reset_parameters() drawn from torch's CPU generator seeded with `seed` (so the result does not
    depend on the device or on the global RNG, which is restored afterwards)."""
    device = next(m.parameters()).device
    reset = getattr(m, "reset_parameters")  # noqa: B009 - not every module has one: checked by the caller
    m.to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset()
    m.to(device)


def randomise(module: nn.Module, names: list[str], generator: torch.Generator) -> None:
    """Re-initialise, in place, the parameters held by the modules `names` of `module` (pass a copy of a
    served model, never the model itself).

    A module with its own `reset_parameters` (and no parameters in submodules) is reset by it, seeded from
    `generator`: convs and linears get torch's default kaiming-uniform weights and uniform biases, BatchNorms
    an identity affine map with reset running statistics (sane: no blown-up activations). Other modules'
    parameters are drawn from a normal matched to each one's original statistics: mean 0 and the original
    std for weights (2+ dims), the original mean and std for 1-D parameters (scales stay near their scale).
    A conv that absorbed a BatchNorm at load (service/zoo/fold.py) has its `folded_shift` set to its new
    bias, so Grad-CAM at that layer keeps seeing the conv's own output."""
    for name in names:
        m = module.get_submodule(name)
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        nested = any(True for child in m.children() for _ in child.parameters())
        if callable(getattr(m, "reset_parameters", None)) and not nested:
            _reset_with_seed(m, seed)
        else:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in own:
                    original = p.detach().float().cpu()
                    std = original.std(unbiased=False)
                    mean = original.mean() if p.dim() < 2 else torch.zeros(())
                    p.copy_(mean + std * torch.randn(p.shape, generator=g))
        shift, bias = getattr(m, "folded_shift", None), getattr(m, "bias", None)
        if isinstance(shift, torch.Tensor) and isinstance(bias, torch.Tensor):
            with torch.no_grad():
                shift.copy_(bias)


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass
class _Maps:
    heat: list[torch.Tensor]  # per image, (H, W)
    absolute: list[torch.Tensor] | None  # per image, sum over channels of |attribution|; None: not signed


def _top1(model: LoadedModel, x: torch.Tensor, max_batch: int) -> list[int]:
    with torch.no_grad():
        return [int(i) for chunk in x.split(max_batch)
                for i in model.module(chunk.to(model.device)).argmax(1).tolist()]


def _random_other(top: list[int], num_classes: int, seed: int) -> list[int]:
    """Per image a class other than its top-1, uniform over the others, seeded."""
    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, num_classes - 1, (len(top),), generator=g).tolist()
    return [d + (d >= t) for d, t in zip(drawn, top, strict=True)]


def _repeating(progress: Progress, done: int, total: int) -> Progress:
    """A method's own progress calls, passed on as the report's (done, total) unchanged: a raising progress
    stops the method within one pass."""
    def report(_done: int, _total: int) -> None:
        progress(done, total)
    return report


def _verdict(final: float, random_target: float, cross_image: float | None) -> tuple[str, str]:
    reasons = []
    if final >= RANDOMISED_LIMIT:
        reasons.append(f"explains the image, not the model: its map keeps rank correlation {final:.2f} after "
                       f"every layer is randomised")
        if cross_image is not None and cross_image >= RANDOMISED_LIMIT:
            reasons[-1] += (f" (and its maps of different images correlate {cross_image:.2f}: a pattern they "
                            "share)")
    if random_target >= CLASS_LIMIT:
        reasons.append(f"not class-discriminative: its map for a random other class keeps rank correlation "
                       f"{random_target:.2f} with the top class's")
    if reasons:
        return "fail", "; ".join(reasons)
    return "pass", (f"its map follows the model (rank correlation {final:.2f} once every layer is "
                    f"randomised) and the class ({random_target:.2f} with a random other class's)")


def sanity_report(model: LoadedModel, methods: list[Method], x: torch.Tensor, *,
                  params: dict[str, MethodParams] | None = None, progress: Progress | None = None,
                  seed: int = 0, max_batch: int = 16) -> dict[str, Any]:
    """The sanity report of `methods` on `model` for the images `x` ((B, 3, H, W), preprocessed).

    params: per method name, its parameters (default: the method's defaults). Targets: each image's top-1
    class on the original model, kept for every level. seed: of the randomised weights and of the random
    other classes (the same seed gives the same report). progress(done, total) counts method runs, total =
    methods x (levels + 2): it is called before every run (and again, unchanged, before every pass of it), so
    a progress that raises stops the report there.

    Returns {"model", "images", "methods": {name: {"levels": [{"layers", "spearman", "spearman_abs",
    "constant_maps"}], "random_target": {"spearman"}, "cross_image": {"spearman"}, "verdict", "reason"}},
    "skipped": {name: reason}}:
    - "skipped": the methods that refuse this model (InvalidInput on its first run, e.g. FullGrad on a
      transformer), with their reason; they have no entry in "methods" and their runs leave `total`;
    - level i has levels 0..i randomised; "layers" are the blocks level i adds;
    - "spearman": the mean over images of the rank correlation of the heatmaps (the maps the service serves)
      on the original and the randomised model; "spearman_abs": the same on the per-pixel sum over channels
      of |attribution|, for a method with signed per-pixel attributions (else None); "constant_maps": how
      many of the randomised model's maps are constant (e.g. an all-zero Grad-CAM; each counts as 0);
    - "random_target": the same between the top class's map and a random other class's, original model;
    - "cross_image": the mean rank correlation of the original maps of different images (None for one
      image), which tells a pattern shared by every map from the image's own structure;
    - "verdict": "fail" when the fully randomised level keeps >= RANDOMISED_LIMIT or the random class's map
      >= CLASS_LIMIT, else "pass"; "reason": why, in one line.
    """
    params = params or {}
    levels = cascade_blocks(model.module, x[:1].to(model.device))
    total = len(methods) * (len(levels) + 2)
    done = 0

    top = _top1(model, x, max_batch)
    other = _random_other(top, model.num_classes, seed)

    def run(served: LoadedModel, method: Method, targets: list[int]) -> _Maps:
        nonlocal done
        inner = None
        if progress is not None:
            progress(done, total)
            inner = _repeating(progress, done, total)

        chosen = params.get(method.name) or method.Params()
        out = explain(served, method, x, list(targets), chosen, progress=inner, top_k=1, max_batch=max_batch)
        done += 1
        heat = [e.heatmap for e in out]
        attributions = [e.attribution for e in out]
        per_pixel = all(a is not None and a.dim() == 3 and a.shape[-2:] == h.shape
                        for a, h in zip(attributions, heat, strict=True))
        signed = per_pixel and any(bool((a < 0).any()) for a in attributions if a is not None)
        absolute = [a.abs().sum(0) for a in attributions if a is not None] if signed else None
        return _Maps(heat, absolute)

    original: dict[str, _Maps] = {}
    skipped: dict[str, str] = {}
    for m in list(methods):
        try:
            original[m.name] = run(model, m, top)
        except InvalidInput as exc:  # the method refuses this model (FullGrad on a ViT): say why, go on
            skipped[m.name] = exc.message
            methods = [kept for kept in methods if kept is not m]
            total -= len(levels) + 2
    other_class = {m.name: run(model, m, other) for m in methods}

    rows: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    randomised = dataclasses.replace(model, module=copy.deepcopy(model.module))
    generator = torch.Generator().manual_seed(seed)
    for level in levels:
        randomise(randomised.module, level.modules, generator)
        for m in methods:
            maps, before = run(randomised, m, top), original[m.name]
            absolute = None
            if maps.absolute is not None and before.absolute is not None:
                absolute = _mean_spearman(before.absolute, maps.absolute)
            heat = _mean_spearman(before.heat, maps.heat)
            rows[m.name].append({"layers": list(level.blocks), "spearman": heat, "spearman_abs": absolute,
                                 "constant_maps": _constant(maps.heat)})
    if progress is not None:
        progress(total, total)

    report: dict[str, Any] = {}
    for m in methods:
        random_target = _mean_spearman(original[m.name].heat, other_class[m.name].heat)
        cross_image = _cross_image(original[m.name].heat)
        final = rows[m.name][-1]["spearman"] if rows[m.name] else 1.0
        verdict, reason = _verdict(final, random_target, cross_image)
        report[m.name] = {"levels": rows[m.name], "random_target": {"spearman": random_target},
                          "cross_image": {"spearman": cross_image}, "verdict": verdict, "reason": reason}
    return {"model": model.name, "images": int(x.shape[0]), "methods": report, "skipped": skipped}
