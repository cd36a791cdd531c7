"""Tasks -> Label Studio predictions: a brushlabels region carrying the saliency, a box around its most
salient region (saliency_client.salient_region)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface

from saliency_client import Client, ImageExplanation, salient_region

from .fetch import ImageFetcher
from .settings import BackendSettings


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Control:
    from_name: str
    to_name: str
    label: str


@dataclass(frozen=True)
class Targets:
    """Where predictions go in a project's label config."""

    data_key: str  # task.data[data_key] holds the image URL
    brush: Control | None
    box: Control | None

    @classmethod
    def from_config(cls, label_config: str, label: str | None = None) -> Targets:
        interface = LabelInterface(label_config)
        found: dict[str, Control] = {}
        data_key = ""  # from the first control found
        for tag in ("BrushLabels", "RectangleLabels"):
            try:
                from_name, to_name, key = interface.get_first_tag_occurence(tag, "Image")
            except ValueError:
                continue
            labels = list(interface.get_control(from_name).labels)
            if not labels:
                raise ConfigError(f"<{tag} name={from_name!r}> has no <Label>")
            chosen = label if label is not None and label in labels else labels[0]
            found[tag] = Control(from_name, to_name, chosen)
            data_key = data_key or key
        if not found:
            raise ConfigError("the label config needs a <BrushLabels> or <RectangleLabels> on an <Image>")
        return cls(data_key, found.get("BrushLabels"), found.get("RectangleLabels"))


def brush_region(ctl: Control, heat: np.ndarray, score: float) -> dict[str, Any]:
    """The map as Label Studio's brush RLE: 0-255 in every RGBA channel,
    so it shows as graded opacity."""
    h, w = heat.shape
    levels = np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    return {"id": uuid.uuid4().hex[:10], "from_name": ctl.from_name, "to_name": ctl.to_name,
            "type": "brushlabels", "original_width": w, "original_height": h, "image_rotation": 0,
            "score": score,
            "value": {"format": "rle", "rle": brush.mask2rle(levels), "brushlabels": [ctl.label]}}


def box_region(ctl: Control, heat: np.ndarray, threshold: float, score: float) -> dict[str, Any]:
    h, w = heat.shape
    x, y, width, height = salient_region(heat, threshold).box_percent
    return {"id": uuid.uuid4().hex[:10], "from_name": ctl.from_name, "to_name": ctl.to_name,
            "type": "rectanglelabels", "original_width": w, "original_height": h, "image_rotation": 0,
            "score": score, "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0,
                                      "rectanglelabels": [ctl.label]}}


def prediction(targets: Targets, result: ImageExplanation, settings: BackendSettings,
               model: str) -> dict[str, Any]:
    """`model`: the model that made `result` (the explain answer names it)."""
    assert result.map is not None  # predict() asks for the "npy" output
    regions = []
    if targets.brush:
        regions.append(brush_region(targets.brush, result.map, result.probability))
    if targets.box:
        regions.append(box_region(targets.box, result.map, settings.threshold, result.probability))
    return {"model_version": settings.model_version(model), "score": result.probability, "result": regions}


def predict(tasks: list[dict[str, Any]], label_config: str, settings: BackendSettings, client: Client,
            fetcher: ImageFetcher, batch: int = 8) -> list[dict[str, Any]]:
    """One prediction per task, in order; the service explains up to `batch` images per request."""
    deadline = time.monotonic() + settings.timeout  # one answer to Label Studio, however many batches
    targets = Targets.from_config(label_config)
    blobs = [fetcher.fetch(task["data"][targets.data_key], task.get("id")) for task in tasks]
    out: list[dict[str, Any]] = []
    for start in range(0, len(blobs), batch):
        # maps at the original size: Label Studio decodes the RLE into an image of the photo's own size
        explanation = client.explain(blobs[start:start + batch], settings.method, model=settings.model,
                                     outputs=["npy"], size="original", params=settings.params,
                                     timeout=max(deadline - time.monotonic(), 1e-3))
        out += [prediction(targets, r, settings, explanation.model) for r in explanation]
    return out
