"""Explaining one image of a detector: its detections, the ones asked for, and a map for each.

The detections explained are the detector's own on the image (above `score_threshold`, the top
`max_detections` by score), or one of them: by its index in that list (`target`), or the one that best
matches a box and label given in the request (IoU >= MATCH_IOU). D-RISE (drise.py) and per-box Grad-CAM
(box_gradcam.py) then give a map per detection explained.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInput, quote
from ..methods.gradcam import GradCAM
from .base import Detections
from .drise import DriseSettings, EarlyStop, box_iou, drise
from .params import BoxGradcamParams, DetectionParams, DriseParams
from .zoo import LoadedDetector

MATCH_IOU = 0.5
DRISE = "drise"
BOX_GRADCAM = GradCAM.name  # Grad-CAM asked of a detector: per box
DETECTION_METHODS: dict[str, type[DetectionParams]] = {DRISE: DriseParams, BOX_GRADCAM: BoxGradcamParams}
DETECTION_ONLY = {DRISE}  # the methods a classifier does not take
# D-RISE's facts for GET /v1/methods (the classifier methods declare theirs on their classes)
DRISE_FACTS = {
    "title": "D-RISE (Petsiuk et al. 2021)", "cost": "n_masks forwards of the detector (no backward)",
    "cost_factors": ["n_masks"], "iterative": True,
    "diagnostics": {"n_masks": "masks used (fewer than asked when early_stop stopped the image)",
                    "stopped_early": "early_stop ended it once the map stopped changing",
                    "weight_sum": "the masks' summed weights for this detection (0: no mask kept it)"}}


def detector_methods(detector: LoadedDetector) -> list[str]:
    """The methods a detector takes: D-RISE always, per-box Grad-CAM where its graph is there."""
    return [DRISE] + ([BOX_GRADCAM] if detector.module is not None else [])


@dataclass
class DetectionMap:
    box: list[float]  # x1, y1, x2, y2 in pixels of the image explained
    label_index: int
    label: str
    score: float
    heatmap: torch.Tensor  # (H, W) in [0, 1], at the image explained
    diagnostics: dict[str, Any] = field(default_factory=dict)


def label_index(detector: LoadedDetector, label: str) -> int:
    """A class by name (or index, as digits); InvalidInput naming the model's classes otherwise."""
    if label in detector.labels:
        return detector.labels.index(label)
    if label.isascii() and label.isdigit() and int(label) < detector.num_classes:
        return int(label)
    shown = ", ".join(quote(n) for n in detector.labels[:12]) + (", ..." if detector.num_classes > 12 else "")
    raise InvalidInput(f"label {quote(label)} is not a class of {detector.name} ({shown})",
                       code="invalid_params")


def select(found: Detections, params: DetectionParams, detector: LoadedDetector, target: int | None,
           size: tuple[int, int], scale: float) -> tuple[Detections, list[int]]:
    """The detections to explain, and their indices in `found`. `size`: (width, height) of the image as
    uploaded, `scale`: the image explained over the upload (boxes in the request are the upload's)."""
    keep = (found.scores >= params.score_threshold).nonzero().flatten()
    keep = keep[found.scores[keep].argsort(descending=True, stable=True)][:params.max_detections]
    if params.box is not None:
        x1, y1, x2, y2 = params.box
        if x2 > size[0] or y2 > size[1]:
            raise InvalidInput(f"box {list(params.box)} leaves the image ({size[0]}x{size[1]} pixels)",
                               code="invalid_params")
        wanted = torch.tensor([params.box], dtype=torch.float32) * scale
        candidates = keep
        if params.label is not None:
            index = label_index(detector, params.label)
            candidates = keep[found.labels[keep] == index]
        ious = box_iou(wanted, found.boxes[candidates].float())[0] if len(candidates) else torch.zeros(0)
        if not len(ious) or float(ious.max()) < MATCH_IOU:
            return _subset(found, []), []
        keep = candidates[ious.argmax()][None]
    elif params.label is not None:
        raise InvalidInput("label picks a detection together with box (x1,y1,x2,y2)", code="invalid_params")
    if target is not None:
        if not 0 <= target < len(keep):
            raise InvalidInput(f"target {target}: the image has {len(keep)} detections to choose from "
                               f"(indices 0..{len(keep) - 1})" if len(keep) else
                               f"target {target}: the image has no detections above score_threshold "
                               f"{params.score_threshold}", code="invalid_target")
        keep = keep[target:target + 1]
    indices = keep.tolist()
    return _subset(found, indices), indices


def _subset(found: Detections, indices: list[int]) -> Detections:
    at = torch.tensor(indices, dtype=torch.long)
    pick = (lambda t: t[at] if t is not None else None)  # noqa: E731
    return Detections(found.boxes[at], found.labels[at], found.scores[at], pick(found.probs),
                      pick(found.objectness))


Progress = Callable[[int, int], None]


# D-RISE of one image: (detector, image, targets, settings, early stop, progress, should_stop) -> (maps, info)
DriseRunner = Callable[[LoadedDetector, torch.Tensor, Detections, DriseSettings, "EarlyStop | None",
                        "Progress | None", Callable[[], bool]], tuple[torch.Tensor, dict[str, Any]]]


def explain_image(detector: LoadedDetector, method: str, image: torch.Tensor, params: DetectionParams,
                  target: int | None, size: tuple[int, int], *, chunk: int,
                  on_progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                  run_drise: DriseRunner | None = None) -> list[DetectionMap]:
    """The maps of one image (3, H, W) in [0, 1]; `size` the upload's (width, height). `run_drise`: where
    D-RISE's forwards run (the service's lane, lane.py, batching them with other calls'); default here."""
    scale = image.shape[-1] / size[0]
    found = detector.detect(image[None].to(detector.device))[0]
    targets, _ = select(found, params, detector, target, size, scale)
    if method == DRISE:
        assert isinstance(params, DriseParams)
        settings = DriseSettings(params.n_masks, params.grid_size, params.keep_prob, params.seed)
        early_stop = EarlyStop() if params.early_stop else None
        if run_drise is not None:
            maps, info = run_drise(detector, image.to(detector.device), targets, settings, early_stop,
                                   on_progress, should_stop or (lambda: False))
        else:
            maps, info = drise(detector.detect, image.to(detector.device), targets, detector.num_classes,
                               settings, chunk=chunk, early_stop=early_stop, on_progress=on_progress,
                               should_stop=should_stop)
        extra = [{"n_masks": info["n_masks"], "stopped_early": info.get("stopped_early", False),
                  "weight_sum": float(info["weight_sum"][k])} for k in range(len(targets))]
    elif method == BOX_GRADCAM:
        assert isinstance(params, BoxGradcamParams) and detector.module is not None
        from .torchvision_detectors import torchvision_box_gradcam

        layer = params.layer or detector.cam_layer
        try:
            detector.module.get_submodule(layer or "")
        except AttributeError:
            raise InvalidInput(f"layer {quote(layer)} is not a layer of {detector.name}",
                               code="invalid_params") from None
        maps, cam = torchvision_box_gradcam(detector.module, image.to(detector.device), targets, layer)
        extra = [{"matched": m.matched, "iou": round(float(m.iou), 4), "layer": layer,
                  "backward": cam.backward} for m in cam.matches]
    else:
        raise InvalidInput(f"method {quote(method)} does not apply to detectors",
                           code="method_not_applicable")
    return [DetectionMap(box=[round(float(v), 2) for v in targets.boxes[k]],
                         label_index=int(targets.labels[k]), label=detector.labels[int(targets.labels[k])],
                         score=float(targets.scores[k]), heatmap=maps[k].float().cpu(), diagnostics=extra[k])
            for k in range(len(targets))]
