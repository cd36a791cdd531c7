"""torchvision's object detectors behind the service's detector contract (base.py), with their per-box
Grad-CAM (box_gradcam.py).

Built with `torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=N)`: nothing
is downloaded; the operator drops a state dict in the models directory (like the ResNet-50 card's), read
safely (service/zoo/weights.py) and loaded strictly, keys and shapes checked. Until then the card is listed
unavailable (WeightsMissing).

The models take a list of (3, H, W) images in [0, 1] and normalise and resize them themselves (their
`transform`), and return boxes in pixels of each input: the contract's own convention, so `detect` only
converts their dicts to `Detections`.

The Grad-CAM layer (`default_cam_layer`), found from the backbone's structure: the deepest map that every
detection's score depends on, since a box whose score does not depend on the layer gets an empty map.
- FPN backbones (Faster R-CNN, RetinaNet, FCOS; `backbone.body` an IntermediateLayerGetter): the last map the
  body returns (`backbone.body.layer4` for ResNet-50, `backbone.body.16`, the last block of MobileNetV3's
  `features`, for the mobilenet Faster R-CNN): FPN's top-down path adds it into every level the heads read.
- SSD-style extractors (SSDlite: `backbone.features` then `backbone.extra`, no top-down path): each level is
  computed from the one before, so the first, `backbone.features.0` (MobileNetV3 up to the expansion of its
  stride-16 block), is the deepest map they all depend on. Its last map (`features.1`, stride 32) is not: the
  boxes the head reads off the stride-16 level have a zero gradient there (measured, random weights).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
from torch import nn

from ..methods.hooks import get_layer
from ..zoo.cards import CardError, ModelCard
from ..zoo.labels import load_labels
from ..zoo.weights import apply_state_dict, read_state_dict, resolve_weights
from .base import Detections, LoadedDetector
from .box_gradcam import Backward, BoxCamInfo, box_gradcam

# The detectors served, by torchvision's builder name ("torchvision:NAME" in a card).
DETECTORS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
)
COCO_NUM_CLASSES = 91  # torchvision's COCO label space: index 0 "__background__", "N/A" for unused ids


@cache
def coco_labels() -> tuple[str, ...]:
    """The 91 COCO category names of torchvision's detection weights (metadata in its code, no download)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return tuple(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def build_detector(name: str, num_classes: int = COCO_NUM_CLASSES, **kwargs: object) -> nn.Module:
    """An untrained torchvision detector in eval mode with frozen weights. `kwargs` go to the builder
    (min_size, max_size, ...). ValueError for a name not in DETECTORS."""
    if name not in DETECTORS:
        raise ValueError(f"unknown torchvision detector {name!r}; one of {', '.join(DETECTORS)}")
    import torchvision

    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes,
                                         **kwargs)
    return model.eval().requires_grad_(False)


def default_cam_layer(model: nn.Module) -> str:
    """The backbone's feature map every detection depends on (module docstring); ValueError otherwise."""
    backbone = getattr(model, "backbone", None)
    body = getattr(backbone, "body", None)
    return_layers = getattr(body, "return_layers", None)
    if body is not None and getattr(backbone, "fpn", None) is not None and return_layers:
        return f"backbone.body.{list(return_layers)[-1]}"
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential | nn.ModuleList) and len(features) and hasattr(backbone, "extra"):
        return "backbone.features.0"
    raise ValueError(f"no default Grad-CAM layer for {type(model).__name__} with a "
                     f"{type(backbone).__name__} backbone: name one")


def detector_num_classes(model: nn.Module) -> int:
    """The number of classes (background included) of a torchvision detector, read from its head."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:  # Faster R-CNN: the box predictor's class logits
        return int(roi_heads.box_predictor.cls_score.out_features)
    head = getattr(getattr(model, "head", None), "classification_head", None)
    for attribute in ("num_classes", "num_columns"):  # RetinaNet and FCOS; SSD's scoring head
        if hasattr(head, attribute):
            return int(getattr(head, attribute))
    raise ValueError(f"cannot read the number of classes of {type(model).__name__}")


def set_thresholds(model: nn.Module, score_threshold: float | None = None,
                   max_detections: int | None = None) -> None:
    """Set the model's own post-processing: the score below which a box is dropped before NMS and the number
    of boxes kept per image (Faster R-CNN's roi_heads.score_thresh / detections_per_img, the builders'
    box_score_thresh / box_detections_per_img; the others' score_thresh / detections_per_img). None keeps
    torchvision's default (0.05 / 100; FCOS 0.2 / 100; SSDlite 0.001 / 300). Done once when the model is
    built: these are attributes of a model shared between requests."""
    owner = getattr(model, "roi_heads", model)
    if score_threshold is not None:
        if not 0 <= score_threshold <= 1:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        owner.score_thresh = float(score_threshold)
    if max_detections is not None:
        if max_detections < 1:
            raise ValueError(f"max_detections must be at least 1, got {max_detections}")
        owner.detections_per_img = int(max_detections)


def run_detector(model: nn.Module, images: torch.Tensor) -> list[Detections]:
    """The model on a (B, 3, H, W) batch in [0, 1], in the caller's grad mode (box_gradcam needs the
    scores' graph; `TorchvisionDetector.detect` runs it under no_grad)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    device = next(model.parameters()).device
    outputs = model(list(images.to(device)))
    return [Detections(out["boxes"], out["labels"].long(), out["scores"]) for out in outputs]


def layer_extent(model: nn.Module, size: tuple[int, int]) -> tuple[float, float]:
    """The fraction (height, width) of the padded input an (H, W) image fills after the model's transform.

    torchvision's R-CNN transform resizes the image (keeping its aspect) and pads the batch at the bottom and
    right to a multiple of 32, so the backbone's maps cover the padding too; SSDlite resizes to a fixed
    320 x 320 without padding (1.0, 1.0). Read by running the transform on a blank image of that size."""
    transform = getattr(model, "transform", None)
    if transform is None:
        return (1.0, 1.0)
    device = next(model.parameters()).device
    with torch.no_grad():
        batch, _ = transform([torch.zeros(3, *size, device=device)])
    (height, width), padded = batch.image_sizes[0], batch.tensors.shape[-2:]
    return (height / int(padded[0]), width / int(padded[1]))


def torchvision_box_gradcam(model: nn.Module, image: torch.Tensor, targets: Detections,
                            layer: str | None = None, iou_threshold: float = 0.5, *,
                            backward: Backward = "auto",
                            max_batch: int = 32) -> tuple[torch.Tensor, BoxCamInfo]:
    """Per-box Grad-CAM (box_gradcam.box_gradcam) of a torchvision detector, from the module alone (a
    LoadedDetector's `module` and `cam_layer`): image (3, H, W) in [0, 1], targets in pixels of it.
    Returns maps (K, H, W) in [0, 1] and the matches. ValueError for an unknown layer or bad targets."""
    path = layer or default_cam_layer(model)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    return box_gradcam(lambda images: run_detector(model, images), get_layer(model, path), image, targets,
                       iou_threshold, num_classes=detector_num_classes(model),
                       extent=layer_extent(model, size), backward=backward, max_batch=max_batch)


class TorchvisionDetector:
    """A torchvision detector (one of DETECTORS) as a `DetectFn`, with its labels and Grad-CAM layer.

    score_threshold / max_detections: the model's own post-processing (set_thresholds), None: torchvision's
    defaults. labels: one name per class; default COCO's 91 (num_classes must then be 91). model_kwargs go
    to torchvision's builder (min_size, max_size: the size the R-CNN transform resizes to)."""

    def __init__(self, name: str, num_classes: int = COCO_NUM_CLASSES, *,
                 score_threshold: float | None = None, max_detections: int | None = None,
                 labels: Sequence[str] | None = None,
                 device: torch.device | str = "cpu", **model_kwargs: object):
        if labels is None:
            if num_classes != COCO_NUM_CLASSES:
                raise ValueError(f"a detector of {num_classes} classes needs its labels (COCO's are "
                                 f"{COCO_NUM_CLASSES})")
            labels = coco_labels()
        if len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels for {num_classes} classes")
        self.name = name
        self.labels: tuple[str, ...] = tuple(labels)
        self.model = build_detector(name, num_classes, **model_kwargs)
        set_thresholds(self.model, score_threshold, max_detections)
        self.model.to(device)
        self.device = torch.device(device)
        self.default_cam_layer = default_cam_layer(self.model)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def __call__(self, images: torch.Tensor) -> list[Detections]:
        """Differentiable: in the caller's grad mode (the model_fn box_gradcam runs under enable_grad)."""
        return run_detector(self.model, images)

    def detect(self, images: torch.Tensor, score_threshold: float | None = None,
               max_detections: int | None = None) -> list[Detections]:
        """The detections of each image of a (B, 3, H, W) batch in [0, 1], boxes in its pixels, under no_grad.
        score_threshold / max_detections narrow the model's own for this call (a box below the model's
        threshold is gone already); scores come sorted, highest first."""
        with torch.no_grad():
            found = run_detector(self.model, images)
        if score_threshold is None and max_detections is None:
            return found
        narrowed = []
        for d in found:
            keep = torch.argsort(d.scores, descending=True)
            if score_threshold is not None:
                keep = keep[d.scores[keep] >= score_threshold]
            if max_detections is not None:
                keep = keep[:max_detections]
            narrowed.append(Detections(d.boxes[keep], d.labels[keep], d.scores[keep]))
        return narrowed

    def layer_extent(self, size: tuple[int, int]) -> tuple[float, float]:
        return layer_extent(self.model, size)

    def box_gradcam(self, image: torch.Tensor, targets: Detections, layer: str | None = None,
                    iou_threshold: float = 0.5, *, backward: Backward = "auto",
                    max_batch: int = 32) -> tuple[torch.Tensor, BoxCamInfo]:
        """Per-box Grad-CAM at `layer` (default: default_cam_layer); see torchvision_box_gradcam."""
        return torchvision_box_gradcam(self.model, image, targets, layer or self.default_cam_layer,
                                       iou_threshold, backward=backward, max_batch=max_batch)

    def load_weights(self, path: Path, card: ModelCard) -> None:
        """An operator's state dict, read safely (tensors only) and loaded strictly: CardError naming the card
        for a missing or unexpected key or a shape that differs (another num_classes)."""
        apply_state_dict(self.model, read_state_dict(path, card.name), card)


def load_torchvision_detector(card: ModelCard, models_dir: Path, device: torch.device) -> LoadedDetector:
    """A card's torchvision detector with its weights (WeightsMissing, a CardError, when the file is not
    there: listed unavailable). num_classes: the card's, 91 when it leaves it out; labels: COCO's for 91
    classes, else the card's labels file."""
    name = card.arch_name
    if name not in DETECTORS:
        raise CardError(card.name, f"unknown torchvision detector {name!r}; one of {', '.join(DETECTORS)}")
    # a card's num_classes defaults to ImageNet's 1000: a detector card that leaves it out means COCO's
    num_classes = card.num_classes if "num_classes" in card.model_fields_set else COCO_NUM_CLASSES
    card = card.model_copy(update={"num_classes": num_classes})
    if card.labels.source == "file":
        labels = load_labels(card, models_dir)
    elif num_classes == COCO_NUM_CLASSES:
        labels = coco_labels()
    else:
        raise CardError(card.name, f"a detector of {num_classes} classes needs [labels] source = 'file' "
                                   f"(COCO's names are for {COCO_NUM_CLASSES})")
    path = resolve_weights(card.weights, models_dir, card.name)  # before building: a missing file is cheap
    detector = TorchvisionDetector(name, num_classes, labels=labels)
    detector.load_weights(path, card)
    detector.model.to(device)
    detector.device = device
    layer = card.cam.target_layer or detector.default_cam_layer
    try:
        get_layer(detector.model, layer)
    except ValueError as exc:
        raise CardError(card.name, str(exc)) from exc
    return LoadedDetector(card, detector.detect, detector.labels, device, module=detector.model,
                          cam_layer=layer)
