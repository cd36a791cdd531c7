"""CVAT serverless (nuclio) detector: body {"image": base64, "threshold"?: float} -> CVAT's shape list."""
from __future__ import annotations

import base64
import json
import os

from saliency_client import Client, salient_region

from .shapes import nuclio_mask, outline_polygon


def init_context(context) -> None:
    context.user_data.client = Client(os.environ.get("SALIENCY_URL", "http://127.0.0.1:8000"),
                                      os.environ.get("SALIENCY_API_KEY"), max_retries=3)
    context.user_data.method = os.environ.get("SALIENCY_METHOD", "gradcam")
    context.user_data.model = os.environ.get("SALIENCY_MODEL") or None
    context.user_data.region_threshold = float(os.environ.get("SALIENCY_THRESHOLD", 0.5))
    # the whole call, a job the service turned it into included, ends before nuclio's eventTimeout (60 s)
    context.user_data.timeout = float(os.environ.get("SALIENCY_TIMEOUT", 55))


def shapes(image: bytes, client: Client, method: str, model: str | None, region_threshold: float,
           conf_threshold: float | None = None, timeout: float | None = None) -> list[dict]:
    result = client.explain(image, method, model=model, timeout=timeout)[0]
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
                 body.get("threshold"), data.timeout)
    return context.Response(body=json.dumps(out), headers={}, content_type="application/json",
                            status_code=200)
