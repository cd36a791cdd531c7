"""A cvat-sdk detection function: the most salient region of each frame as a mask and a rectangle.

    cvat-cli task auto-annotate TASK_ID --function-module saliency_cvat.function \
        -p url=str:http://127.0.0.1:8000 -p method=str:gradcam -p threshold=float:0.5

The task needs labels named `salient` (mask or any) and `salient region` (rectangle or any).
"""
from __future__ import annotations

import os

import cvat_sdk.auto_annotation as cvataa
import PIL.Image
from cvat_sdk.masks import encode_mask

from saliency_client import Client, salient_region

from .shapes import outline_polygon

MASK, BOX = 0, 1


class SaliencyFunction:
    spec = cvataa.DetectionFunctionSpec(labels=[cvataa.label_spec("salient", MASK, type="mask"),
                                                cvataa.label_spec("salient region", BOX, type="rectangle")])

    def __init__(self, url: str | None = None, method: str = "gradcam", model: str | None = None,
                 threshold: float = 0.5, api_key: str | None = None, **params):
        self.client = Client(url or os.environ.get("SALIENCY_URL", "http://127.0.0.1:8000"),
                             api_key or os.environ.get("SALIENCY_API_KEY"), max_retries=3)
        self.method, self.model, self.threshold, self.params = method, model, threshold, params

    def detect(self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image):
        result = self.client.explain(image, self.method, model=self.model, params=self.params)[0]
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


def create(**kwargs) -> SaliencyFunction:
    """What cvat-cli calls with the `-p name=type:value` parameters."""
    return SaliencyFunction(**kwargs)


_default: SaliencyFunction | None = None
spec = SaliencyFunction.spec


def detect(context, image):
    """Module-level entry (for cvat-cli without -p): settings from SALIENCY_URL and friends."""
    global _default
    if _default is None:
        _default = SaliencyFunction(method=os.environ.get("SALIENCY_METHOD", "gradcam"),
                                    model=os.environ.get("SALIENCY_MODEL") or None,
                                    threshold=float(os.environ.get("SALIENCY_THRESHOLD", 0.5)))
    return _default.detect(context, image)
