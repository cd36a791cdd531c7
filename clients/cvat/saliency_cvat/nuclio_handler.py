"""CVAT serverless (nuclio) detector: body {"image": base64, "threshold"?: float} -> CVAT's shape list.

Of a classifier: the most salient region as a mask (`salient`) and its box (`salient region`). Of a detection
model (SALIENCY_MODEL=mtcnn, SALIENCY_METHOD=drise; nuclio/function-mtcnn.yaml): each detection's box
(`rectangle`) and its map's most salient region (`mask`), both with the detection's label."""
from __future__ import annotations

import base64
import json
import os

from saliency_client import (
    Client,
    DetectionExplanation,
    ImageDetections,
    salient_region,
    salient_region_in_box,
)

from .shapes import nuclio_mask, outline_polygon


def init_context(context) -> None:
    context.user_data.client = Client(os.environ.get("SALIENCY_URL", "http://127.0.0.1:8000"),
                                      os.environ.get("SALIENCY_API_KEY"), max_retries=3)
    context.user_data.method = os.environ.get("SALIENCY_METHOD", "gradcam")
    context.user_data.model = os.environ.get("SALIENCY_MODEL") or None
    context.user_data.region_threshold = float(os.environ.get("SALIENCY_THRESHOLD", 0.5))
    # the method's parameters as JSON, e.g. {"n_masks": 300} for D-RISE (whose default 1,000 is slow on a CPU)
    context.user_data.params = json.loads(os.environ.get("SALIENCY_PARAMS") or "{}")
    # the whole call, a job the service turned it into included, ends before nuclio's eventTimeout (60 s)
    context.user_data.timeout = float(os.environ.get("SALIENCY_TIMEOUT", 55))


def detection_shapes(found: ImageDetections, region_threshold: float,
                     conf_threshold: float | None = None) -> list[dict]:
    """Per detection (score at `conf_threshold` or above) its box and the salient region of its map within
    the box (saliency_client.salient_region_in_box), as CVAT's shapes with the detection's label: CVAT matches
    labels by name, so the task needs the detector's labels (type any, which takes both a rectangle and a
    mask)."""
    out: list[dict] = []
    for d in found:
        if conf_threshold is not None and d.score < conf_threshold:
            continue
        assert d.map is not None  # the default outputs hold "npy"
        region = salient_region_in_box(d.map, d.box, region_threshold)
        confidence = f"{d.score:.4f}"
        out += [{"label": d.label, "type": "rectangle", "confidence": confidence, "points": list(d.box)},
                {"label": d.label, "type": "mask", "confidence": confidence,
                 "points": outline_polygon(region.mask), "mask": nuclio_mask(region.mask, region.box)}]
    return out


def shapes(image: bytes, client: Client, method: str, model: str | None, region_threshold: float,
           conf_threshold: float | None = None, timeout: float | None = None,
           params: dict | None = None) -> list[dict]:
    answer = client.explain(image, method, model=model, timeout=timeout, params=params)
    if isinstance(answer, DetectionExplanation):
        return detection_shapes(answer[0], region_threshold, conf_threshold)
    result = answer[0]
    if conf_threshold is not None and result.probability < conf_threshold:
        return []
    assert result.map is not None  # the default outputs hold "npy"
    region = salient_region(result.map, region_threshold)
    x1, y1, x2, y2 = region.box
    confidence = f"{result.probability:.4f}"  # CVAT's serverless functions send it as a string
    return [{"label": "salient", "type": "mask", "confidence": confidence,
             "points": outline_polygon(region.mask), "mask": nuclio_mask(region.mask, region.box)},
            {"label": "salient region", "type": "rectangle", "confidence": confidence,
             "points": [x1, y1, x2, y2]}]


def handler(context, event):
    body = event.body if isinstance(event.body, dict) else json.loads(event.body)
    data = context.user_data
    out = shapes(base64.b64decode(body["image"]), data.client, data.method, data.model, data.region_threshold,
                 body.get("threshold"), data.timeout, data.params)
    return context.Response(body=json.dumps(out), headers={}, content_type="application/json",
                            status_code=200)
