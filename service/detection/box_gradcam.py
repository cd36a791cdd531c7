"""Per-box Grad-CAM for detectors: the Grad-CAM (Selvaraju et al. 2017) of one detection's score at a feature
map of the detector's backbone.

For each target detection (a box and a label, in pixels of the image), the detector is run once on the image
with gradients enabled and its own post-processing (score threshold, NMS, top-k); the target is matched to
the output detection of the same label with the best IoU (at least `iou_threshold`), and that detection's
score y is explained: channel weights w_c = mean_ij dy/dA_cij, map = ReLU(sum_c w_c A_c), upsampled
bilinearly to the image and min-max normalised, as service/methods/gradcam.py does for a class logit.

The score is taken after the post-processing because that is the number the user sees next to the box; the
post-processing only selects and reorders (indexing, top-k, NMS indices), so the selected score stays a
differentiable function of the feature map. In torchvision's detectors (measured, tests/test_box_gradcam.py):
Faster R-CNN's score is the softmax of the box head's class logits over RoIAlign-pooled FPN features (the
proposals themselves are detached by torchvision: the gradient does not flow through the RPN); RetinaNet's
is the sigmoid of its classification head's logit; FCOS's sqrt(sigmoid(class) * sigmoid(centerness));
SSDlite's the softmax of its classification head.

All boxes of an image are explained from one forward and one batched backward
(`torch.autograd.grad(..., is_grads_batched=True)`, a vmap over the backward with the rows of an identity as
the output gradients), in chunks of `max_batch` boxes to bound memory (each box carries its own copy of every
gradient in the backward). vmap goes through all five torchvision detectors of
service/detection/torchvision_detectors.py, Faster R-CNN's RoIAlign backward included, with the looped maps'
values (tests/test_box_gradcam.py; fasterrcnn_resnet50_fpn, the mobilenet one's graph on a ResNet, checked
outside the suite for time). A graph with an op vmap cannot batch (a custom autograd.Function whose backward
reads a Python number: "Batching rule not implemented for aten::item") falls back to one backward per box
over the retained graph, with equal maps. On the CPU neither is consistently faster (the backward's cost
is per box either way); batching saves the per-call overhead where the device is fast.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from .base import DetectFn, Detections

Backward = Literal["auto", "batched", "looped"]

# What vmap raises when an op of the backward has no batching rule and its fallback cannot run either
# (`.item()`, `.numpy()`, in-place ops on views); anything else is a real error and propagates.
_VMAP_FAILURES = ("Batching rule not implemented", "vmap")
# How far (pixels) a target box may cross the image's edge: detectors' own boxes, rescaled to the input's
# pixels in float32, end at 50.000004 on a 50-pixel image.
_EDGE = 0.5


@dataclass(frozen=True)
class BoxMatch:
    """How one target detection was found again in the detector's output."""

    matched: bool
    iou: float  # the best IoU with an output detection of the same label (0.0 when there is none)
    index: int | None = None  # that output detection's index in `BoxCamInfo.detections`, when matched
    score: float | None = None  # its score, the number whose gradient made the map


@dataclass(frozen=True)
class BoxCamInfo:
    matches: list[BoxMatch]
    detections: Detections  # the detector's output on the image, detached (what the targets were matched to)
    layer_size: tuple[int, int]  # the feature map's (height, width): the maps' resolution before upsampling
    # "batched": one vmapped backward per chunk of boxes; "looped": one backward per box; "none": nothing
    # was matched, no backward ran
    backward: Literal["batched", "looped", "none"]


@dataclass(eq=False)
class _LeafCapture:
    """Makes a module's first output (on the thread that opened it) a leaf that requires grad, and records it.

    The rest of the network computes from that leaf, so the graph starts at the layer: the detector's weights
    are frozen and the image needs no gradient, so nothing before the layer is kept for the backward (Grad-CAM
    only needs d score / d activation). The network gets a copy of the leaf, as hooks.OutputCapture hands on
    a copy: a layer whose output is then changed in place (a ResNet block's bn3 before `out += identity`)
    would otherwise modify a leaf that requires grad, which autograd refuses. The hook is removed on exit;
    other threads' forward passes through the same (shared) model are left alone, as in hooks.py."""

    module: nn.Module
    leaves: list[torch.Tensor] = field(default_factory=list)
    _owner: int = 0
    _handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> _LeafCapture:
        self._owner = threading.get_ident()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, _module: nn.Module, _inputs: object, output: object) -> torch.Tensor | None:
        if self.leaves or threading.get_ident() != self._owner or not isinstance(output, torch.Tensor):
            return None
        leaf = output.detach().requires_grad_(True)
        self.leaves.append(leaf)
        return leaf.clone()


def check_targets(targets: Detections, size: tuple[int, int], num_classes: int | None) -> None:
    """ValueError naming the first bad target: a box not inside the (H, W) image (up to half a pixel beyond
    its edges), an empty or inverted box, a label outside [0, num_classes)."""
    height, width = size
    boxes, labels = targets.boxes, targets.labels
    if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
        raise ValueError(f"targets need boxes of shape (K, 4) and labels of shape (K,), got "
                         f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
        x1, y1, x2, y2 = box
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"target {k}: box {box} is not finite")
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"target {k}: box {box} is empty or inverted (x1, y1, x2, y2 needs x2 > x1 and "
                             "y2 > y1)")
        if x1 < -_EDGE or y1 < -_EDGE or x2 > width + _EDGE or y2 > height + _EDGE:
            raise ValueError(f"target {k}: box {box} is not inside the {width}x{height} image "
                             "(x1, y1, x2, y2 in pixels)")
        if num_classes is not None and not 0 <= label < num_classes:
            raise ValueError(f"target {k}: label {label} is not a class of this detector "
                             f"(0..{num_classes - 1})")


def match_targets(targets: Detections, outputs: Detections, iou_threshold: float) -> list[BoxMatch]:
    """Each target's output detection of the same label with the best IoU, if that IoU >= iou_threshold."""
    if len(targets) == 0:
        return []
    if len(outputs) == 0:
        return [BoxMatch(False, 0.0) for _ in range(len(targets))]
    iou = box_iou(targets.boxes.float(), outputs.boxes.detach().float().to(targets.boxes.device))
    same = targets.labels.view(-1, 1) == outputs.labels.to(targets.labels.device).view(1, -1)
    iou = torch.where(same, iou, torch.zeros_like(iou))
    best, index = iou.max(1)
    scores = outputs.scores.detach()
    return [BoxMatch(True, b, i, float(scores[i])) if b >= iou_threshold and b > 0 else BoxMatch(False, b)
            for b, i in zip(best.tolist(), index.tolist(), strict=True)]


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1]; an exactly constant map (a score that does not depend on the layer) is all
    zeros. Unlike postprocess.minmax, no absolute epsilon: an untrained detector's maps can span 1e-17 (its
    activations vanish through the backbone), still a ranking worth showing."""
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    span = high - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(maps))


def _is_vmap_failure(exc: RuntimeError) -> bool:
    return any(marker in str(exc) for marker in _VMAP_FAILURES)


def score_gradients(scores: torch.Tensor, activation: torch.Tensor, backward: Backward = "auto",
                    max_batch: int = 32) -> tuple[torch.Tensor, Literal["batched", "looped"]]:
    """(M,) scores -> (M, *activation.shape): each score's gradient w.r.t. the activation, and how it was
    computed. "auto": batched, falling back to the loop when vmap cannot go through the graph."""
    count = scores.shape[0]
    if not scores.requires_grad:
        raise ValueError("the detector's scores carry no gradient: run it with gradients enabled (not under "
                         "no_grad or inference_mode) and with differentiable scores")

    def grad(outputs: torch.Tensor, grad_outputs: torch.Tensor, batched: bool) -> torch.Tensor:
        # retain_graph: later chunks (and the loop, after a failed batched attempt) reuse the graph.
        # allow_unused: a score that does not depend on the layer at all (a constant) has a zero gradient.
        (g,) = torch.autograd.grad(outputs, activation, grad_outputs=grad_outputs, retain_graph=True,
                                   is_grads_batched=batched, allow_unused=True)
        if g is None:
            shape = (grad_outputs.shape[0], *activation.shape) if batched else activation.shape
            return torch.zeros(shape, dtype=activation.dtype, device=activation.device)
        return g

    eye = torch.eye(count, dtype=scores.dtype, device=scores.device)
    if backward != "looped":
        try:
            chunks = [grad(scores, eye[start:start + max_batch], True)
                      for start in range(0, count, max_batch)]
            return torch.cat(chunks), "batched"
        except RuntimeError as exc:
            if backward == "batched" or not _is_vmap_failure(exc):
                raise
    return torch.stack([grad(scores, eye[m], False) for m in range(count)]), "looped"


def box_gradcam(model_fn: DetectFn, layer_module: nn.Module, image: torch.Tensor, targets: Detections,
                iou_threshold: float = 0.5, *, num_classes: int | None = None,
                extent: tuple[float, float] = (1.0, 1.0), backward: Backward = "auto",
                max_batch: int = 32) -> tuple[torch.Tensor, BoxCamInfo]:
    """Grad-CAM of each target detection's score at `layer_module`'s output.

    model_fn: the detector, (B, 3, H, W) in [0, 1] -> list[Detections], with scores differentiable w.r.t. the
        layer (its weights frozen; it is called once, under torch.enable_grad).
    layer_module: a module of the detector that outputs a (1, C, h, w) map (its first call in the forward).
    image: (3, H, W) in [0, 1]. targets: boxes (K, 4) x1, y1, x2, y2 in pixels of `image`, labels (K,).
    num_classes: when given, a target label outside [0, num_classes) is a ValueError.
    extent: the fraction (height, width) of the layer's map that covers the image, from its top-left corner
        (a detector that pads its input, as torchvision's R-CNN transform pads to a multiple of 32, has
        the rest of the map over the padding); TorchvisionDetector.layer_extent gives it.
    backward: "auto" (batched, else looped), or force one ("batched" raises where vmap cannot run).

    Returns (maps, info): maps (K, H, W) in [0, 1], an unmatched target's all zeros (`info.matches[k]`
    says which, with the IoU and score of the match); a matched detection whose score does not depend on
    the layer also gets zeros (min-max of a constant map). ValueError for bad targets (check_targets).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if not all(0 < e <= 1 for e in extent):
        raise ValueError(f"extent must be fractions in (0, 1], got {extent}")
    size = (int(image.shape[1]), int(image.shape[2]))
    check_targets(targets, size, num_classes)

    with torch.enable_grad(), _LeafCapture(layer_module) as capture:
        outputs = model_fn(image.detach()[None])[0]
    if not capture.leaves:
        raise ValueError("the layer produced no tensor output in the detector's forward pass")
    activation = capture.leaves[0]
    if activation.dim() != 4 or activation.shape[0] != 1:
        raise ValueError(f"the layer's output has shape {tuple(activation.shape)}, not (1, C, h, w): "
                         "choose a convolutional feature map")
    matches = match_targets(targets, outputs, iou_threshold)
    detached = Detections(outputs.boxes.detach(), outputs.labels.detach(), outputs.scores.detach(),
                          None if outputs.probs is None else outputs.probs.detach(),
                          None if outputs.objectness is None else outputs.objectness.detach())
    layer_size = (int(activation.shape[2]), int(activation.shape[3]))
    maps = torch.zeros(len(targets), *size, device=image.device)
    # each output detection is differentiated once, however many targets matched it
    wanted = sorted({m.index for m in matches if m.index is not None})
    if not wanted:
        return maps, BoxCamInfo(matches, detached, layer_size, "none")

    grads, how = score_gradients(outputs.scores[wanted], activation, backward, max_batch)
    # float32 from here on (under autocast the layer may be bf16/fp16)
    acts, grads = activation.detach()[0].float(), grads[:, 0].float()  # (C, h, w), (M, C, h, w)
    weights = grads.mean(dim=(2, 3))  # (M, C)
    cams = torch.einsum("mc,chw->mhw", weights, acts).clamp_min(0)
    # the map covers size / extent pixels of the image's frame: upsample to that, keep the image's corner
    full = (math.ceil(size[0] / extent[0] - 1e-6), math.ceil(size[1] / extent[1] - 1e-6))
    heat = F.interpolate(cams[:, None], size=full, mode="bilinear", align_corners=False)[:, 0]
    heat = _minmax(heat[:, :size[0], :size[1]])
    row = {index: r for r, index in enumerate(wanted)}
    for k, match in enumerate(matches):
        if match.index is not None:
            maps[k] = heat[row[match.index]].to(maps.device)
    return maps, BoxCamInfo(matches, detached, layer_size, how)
