"""The engine's front door: predict, pick targets, run a method, return one explanation per image."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .methods import Method, MethodParams, Progress
from .zoo import LoadedModel


@dataclass
class ClassScore:
    index: int
    label: str
    probability: float


@dataclass
class ImageExplanation:
    target: int
    label: str
    probability: float
    top_k: list[ClassScore]
    heatmap: torch.Tensor  # (H, W) float32 in [0, 1] at model-input resolution, on the CPU
    attribution: torch.Tensor  # signed, on the CPU
    diagnostics: dict[str, Any] = field(default_factory=dict)


def check_targets(model: LoadedModel, targets: list[int | None]) -> None:
    for i, t in enumerate(targets):
        if t is not None and not 0 <= t < model.num_classes:
            raise ValueError(f"target {t} for image {i} is out of range: {model.name} has classes "
                             f"0..{model.num_classes - 1}")


def explain(model: LoadedModel, method: Method, x: torch.Tensor, targets: list[int | None], params: MethodParams,
            *, progress: Progress | None = None, top_k: int = 5, max_batch: int = 64) -> list[ImageExplanation]:
    """x: (B, 3, H, W) preprocessed images; a None target means the top-1 class of that image."""
    check_targets(model, targets)
    x = x.to(model.device, non_blocking=True)
    with torch.no_grad():
        probabilities = torch.cat([model.module(c) for c in x.split(max_batch)]).float().softmax(1)
    top_p, top_i = probabilities.topk(min(top_k, model.num_classes), dim=1)
    chosen = torch.tensor([top_i[b, 0].item() if t is None else t for b, t in enumerate(targets)],
                          device=model.device)
    result = method.attribute(model.explainee(max_batch), x, chosen, params, progress)
    heat = result.heatmap.float().cpu()
    attribution = result.attribution.float().cpu()
    chosen_p = probabilities.gather(1, chosen.view(-1, 1)).squeeze(1).tolist()
    out = []
    for b, target in enumerate(chosen.tolist()):
        out.append(ImageExplanation(
            target=target, label=model.labels[target], probability=chosen_p[b],
            top_k=[ClassScore(i, model.labels[i], p) for i, p in zip(top_i[b].tolist(), top_p[b].tolist())],
            heatmap=heat[b], attribution=attribution[b], diagnostics=result.diagnostics[b]))
    return out
