"""A cvat-sdk detection function: the most salient region of each frame as a mask and a rectangle.

    cvat-cli task auto-annotate TASK_ID --function-module saliency_cvat.function \
        -p url=str:http://127.0.0.1:8000 -p method=str:gradcam -p threshold=float:0.5

The task needs labels named `salient` (mask or any) and `salient region` (rectangle or any).

Of a detection model, name its labels (`-p model=str:mtcnn -p method=str:drise -p labels=str:face`, or
SALIENCY_LABELS): each detection becomes its box (rectangle) and its map's most salient region (mask), both
with the detection's label; the task's labels of those names must be of type any to take both.
"""
from __future__ import annotations

import os

import cvat_sdk.auto_annotation as cvataa
import PIL.Image
from cvat_sdk.masks import encode_mask

from saliency_client import Client, DetectionExplanation, salient_region, salient_region_in_box

from .shapes import outline_polygon

MASK, BOX = 0, 1


CLASSIFIER_SPEC = cvataa.DetectionFunctionSpec(labels=[cvataa.label_spec("salient", MASK, type="mask"),
                                                       cvataa.label_spec("salient region", BOX,
                                                                         type="rectangle")])


def detector_spec(labels: list[str]) -> cvataa.DetectionFunctionSpec:
    """A detection model's labels, ids in the order given; no type (any): each takes a box and a mask."""
    return cvataa.DetectionFunctionSpec(labels=[cvataa.label_spec(name, i) for i, name in enumerate(labels)])


def _labels(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


class SaliencyFunction:
    spec = CLASSIFIER_SPEC

    def __init__(self, url: str | None = None, method: str = "gradcam", model: str | None = None,
                 threshold: float = 0.5, api_key: str | None = None, labels: str | None = None, **params):
        """`labels`: a detection model's class names, comma-separated (its spec: each detection's shapes
        carry its label; detections of other labels are left out)."""
        self.client = Client(url or os.environ.get("SALIENCY_URL", "http://127.0.0.1:8000"),
                             api_key or os.environ.get("SALIENCY_API_KEY"), max_retries=3)
        self.method, self.model, self.threshold, self.params = method, model, threshold, params
        self.labels = _labels(labels)
        if self.labels:
            self.spec = detector_spec(self.labels)

    def detect(self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image):
        answer = self.client.explain(image, self.method, model=self.model, params=self.params)
        if isinstance(answer, DetectionExplanation):
            return self._detections(context, answer)
        if self.labels:
            raise ValueError(f"labels were given, but {answer.model} answered as a classifier")
        result = answer[0]
        if context.conf_threshold is not None and result.probability < context.conf_threshold:
            return []  # the class the map explains is below the caller's confidence floor
        assert result.map is not None  # the default outputs hold "npy"
        region = salient_region(result.map, self.threshold)
        x1, y1, x2, y2 = region.box
        if context.conv_mask_to_poly:
            shape = cvataa.polygon(MASK, outline_polygon(region.mask))
        else:
            shape = cvataa.mask(MASK, encode_mask(region.mask, region.box))
        return [shape, cvataa.rectangle(BOX, [x1, y1, x2, y2])]


    def _detections(self, context: cvataa.DetectionFunctionContext, answer: DetectionExplanation):
        if not self.labels:
            raise ValueError(f"{answer.model} is a detection model: name its labels (labels=str:face,...) so "
                             "the function's spec declares them")
        out = []
        for d in answer[0]:
            if d.label not in self.labels or (context.conf_threshold is not None
                                              and d.score < context.conf_threshold):
                continue
            assert d.map is not None  # the default outputs hold "npy"
            label = self.labels.index(d.label)
            region = salient_region_in_box(d.map, d.box, self.threshold)
            if context.conv_mask_to_poly:
                shape = cvataa.polygon(label, outline_polygon(region.mask))
            else:
                shape = cvataa.mask(label, encode_mask(region.mask, region.box))
            out += [cvataa.rectangle(label, list(d.box)), shape]
        return out


def create(**kwargs) -> SaliencyFunction:
    """What cvat-cli calls with the `-p name=type:value` parameters."""
    return SaliencyFunction(**kwargs)


_default: SaliencyFunction | None = None
_env_labels = _labels(os.environ.get("SALIENCY_LABELS"))
spec = detector_spec(_env_labels) if _env_labels else CLASSIFIER_SPEC


def detect(context, image):
    """Module-level entry (for cvat-cli without -p): settings from SALIENCY_URL and friends."""
    global _default
    if _default is None:
        _default = SaliencyFunction(method=os.environ.get("SALIENCY_METHOD", "gradcam"),
                                    model=os.environ.get("SALIENCY_MODEL") or None,
                                    threshold=float(os.environ.get("SALIENCY_THRESHOLD", 0.5)),
                                    labels=os.environ.get("SALIENCY_LABELS"))
    return _default.detect(context, image)
