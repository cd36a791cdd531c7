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
    attribution: torch.Tensor | None  # signed, on the CPU (None when not asked for)
    diagnostics: dict[str, Any] = field(default_factory=dict)


def check_targets(model: LoadedModel, targets: list[int | None]) -> None:
    for i, t in enumerate(targets):
        if t is not None and not 0 <= t < model.num_classes:
            raise ValueError(f"target {t} for image {i} is out of range: {model.name} has classes "
                             f"0..{model.num_classes - 1}")


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def explain(model: LoadedModel, method: Method, x: torch.Tensor, targets: list[int | None], params: MethodParams,
            *, progress: Progress | None = None, top_k: int = 5, max_batch: int = 64,
            keep_attribution: list[bool] | None = None) -> list[ImageExplanation]:
    """x: (B, 3, H, W) preprocessed images; a None target means the top-1 class of that image.

    The prediction comes from the forward pass the method makes anyway (no extra pass); maps are copied to
    the CPU once, and signed attributions only for the images in `keep_attribution` (default all).
    """
    check_targets(model, targets)
    x = x.to(model.device, non_blocking=True)
    wanted = torch.tensor([-1 if t is None else t for t in targets], device=model.device)
    precision = getattr(params, "precision", None) or "fp32"
    with torch.autocast(model.device.type, dtype=AUTOCAST.get(precision, torch.float32),
                        enabled=precision != "fp32"):
        result = method.attribute(model.explainee(max_batch), x, wanted, params, progress)
    probabilities = result.logits.float().softmax(1)
    top_p, top_i = probabilities.topk(min(top_k, model.num_classes), dim=1)
    chosen = result.targets
    chosen_p = probabilities.gather(1, chosen.view(-1, 1)).squeeze(1).tolist()
    heat = result.heatmap.float().cpu()
    keep = keep_attribution if keep_attribution is not None else [True] * x.shape[0]
    out = []
    for b, (target, top_ib, top_pb) in enumerate(zip(chosen.tolist(), top_i.tolist(), top_p.tolist())):
        out.append(ImageExplanation(
            target=target, label=model.labels[target], probability=chosen_p[b],
            top_k=[ClassScore(i, model.labels[i], p) for i, p in zip(top_ib, top_pb)],
            heatmap=heat[b], attribution=result.attribution[b].float().cpu() if keep[b] else None,
            diagnostics=result.diagnostics[b]))
    return out
