"""Tasks -> Label Studio predictions: a brushlabels region carrying the saliency, a box around its most
salient region (saliency_client.salient_region); scored by the class probability or the map's faithfulness."""
from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface
from PIL import ExifTags, Image

from saliency_client import (
    APIStatusError,
    Client,
    ImageExplanation,
    PayloadTooLargeError,
    SaliencyError,
    ValidationError,
    salient_region,
)

from .faithfulness import describe, faithfulness_score
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


def brush_region(ctl: Control, heat: np.ndarray, score: float, note: str | None = None) -> dict[str, Any]:
    """The map as Label Studio's brush RLE: 0-255 in every RGBA channel,
    so it shows as graded opacity. `note`: the region's meta text (shown in its details in the editor)."""
    h, w = heat.shape
    levels = np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    region = {"id": uuid.uuid4().hex[:10], "from_name": ctl.from_name, "to_name": ctl.to_name,
              "type": "brushlabels", "original_width": w, "original_height": h, "image_rotation": 0,
              "score": score,
              "value": {"format": "rle", "rle": brush.mask2rle(levels), "brushlabels": [ctl.label]}}
    if note is not None:
        region["meta"] = {"text": [note]}
    return region


def box_region(ctl: Control, heat: np.ndarray, threshold: float, score: float,
               note: str | None = None) -> dict[str, Any]:
    h, w = heat.shape
    x, y, width, height = salient_region(heat, threshold).box_percent
    region = {"id": uuid.uuid4().hex[:10], "from_name": ctl.from_name, "to_name": ctl.to_name,
              "type": "rectanglelabels", "original_width": w, "original_height": h, "image_rotation": 0,
              "score": score, "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0,
                                        "rectanglelabels": [ctl.label]}}
    if note is not None:
        region["meta"] = {"text": [note]}
    return region


class Explained(NamedTuple):
    """One photo's answer: the map at the photo's size, the explained class and its probability, the model
    that made it (the explain answer names it), and the map's metrics when they were asked for."""

    heat: np.ndarray
    label: str
    probability: float
    model: str
    metrics: dict[str, Any] | None = None


def prediction(targets: Targets, found: Explained, settings: BackendSettings) -> dict[str, Any]:
    """A task's prediction. Its score (and each region's) is the class probability, or with
    score_by="faithfulness" the map's faithfulness score (faithfulness.py), whose raw figures go into each
    region's meta text: Label Studio keeps a result's `meta` and shows its `text` in the region's details."""
    if settings.score_by == "faithfulness":
        if found.metrics is None:
            raise SaliencyError("the saliency service answered without the map's metrics (outputs=metrics)")
        score = faithfulness_score(found.metrics)
        note: str | None = describe(found.metrics, score, found.label, found.probability)
    else:
        score, note = found.probability, None
    regions = []
    if targets.brush:
        regions.append(brush_region(targets.brush, found.heat, score, note))
    if targets.box:
        regions.append(box_region(targets.box, found.heat, settings.threshold, score, note))
    return {"model_version": settings.model_version(found.model), "score": score, "result": regions}


# 413s that fewer images per request avoid: the answer's bound, the pixels or the number of images per request
SPLITTABLE = ("response_too_large", "too_many_pixels", "too_many_images")


def splittable(exc: APIStatusError) -> bool:
    """A refusal that fewer images per request avoid: one of the 413s above, or the 422 `too_costly` (a
    request's passes grow with its images, and the metrics add 4(K-1)+1 forward passes to each)."""
    if isinstance(exc, PayloadTooLargeError):
        return exc.code in SPLITTABLE
    return isinstance(exc, ValidationError) and exc.code == "too_costly"


def png_map(result: ImageExplanation) -> np.ndarray:
    """The 8-bit PNG map as float32 in [0, 1]: the brush's levels are exactly the PNG's (both round the map x
    255), and the box moves by at most a level's rounding."""
    assert result.png is not None  # explain() asks for the "png" output
    return np.asarray(result.png.convert("L"), dtype=np.float32) / np.float32(255.0)


def photo_size(blob: bytes) -> tuple[int, int]:
    """(width, height) of the photo as shown (EXIF orientation applied, as the service's maps are), from its
    header."""
    with Image.open(io.BytesIO(blob)) as image:
        width, height = image.size
        try:
            turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        except Exception:  # broken EXIF: the service keeps the stored orientation too
            turned = False
    return (height, width) if turned else (width, height)


def resized(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map to `size` = (width, height), as the service makes an original-size map."""
    out = Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def explain_maps(blobs: list[bytes], settings: BackendSettings, client: Client,
                 deadline: float) -> list[Explained]:
    """Each blob's map at the photo's size with its class, probability, model (and metrics), in order.

    Label Studio decodes the brush RLE into an image of the photo's own size, so the maps come at the original
    size, as 8-bit PNGs: the brush holds 8-bit levels anyway, and a PNG takes at most 1.34 bytes per pixel in
    the answer where a float32 .npy takes 5.3 (the service refuses an answer over its max_response_bytes).
    A batch still refused as too large (or too costly: see splittable) is split in halves; a single photo
    whose map alone is too large gets the map at the model input, resized here as the service would have: the
    same map, so every task still gets its prediction rather than an error a labeling team could do nothing
    about. With score_by="faithfulness" the service also measures each map (outputs "metrics")."""
    outputs = ["png", "metrics"] if settings.score_by == "faithfulness" else ["png"]

    def call(chunk: list[bytes], size: str):
        return client.explain(chunk, settings.method, model=settings.model, outputs=outputs, size=size,
                              params=settings.params, timeout=max(deadline - time.monotonic(), 1e-3))

    try:
        explanation = call(blobs, "original")
    except (PayloadTooLargeError, ValidationError) as exc:
        if len(blobs) > 1 and splittable(exc):
            half = (len(blobs) + 1) // 2
            return (explain_maps(blobs[:half], settings, client, deadline)
                    + explain_maps(blobs[half:], settings, client, deadline))
        if exc.code != "response_too_large":
            raise
        explanation = call(blobs, "input")
        return [Explained(resized(png_map(r), photo_size(blob)), r.label, r.probability, explanation.model,
                          r.metrics) for blob, r in zip(blobs, explanation, strict=True)]
    return [Explained(png_map(r), r.label, r.probability, explanation.model, r.metrics) for r in explanation]


def predict(tasks: list[dict[str, Any]], label_config: str, settings: BackendSettings, client: Client,
            fetcher: ImageFetcher, batch: int = 8) -> list[dict[str, Any]]:
    """One prediction per task, in order; the service explains up to `batch` images per request (fewer when
    it answers that the batch's answer would be too large: see explain_maps)."""
    deadline = time.monotonic() + settings.timeout  # one answer to Label Studio, however many batches
    targets = Targets.from_config(label_config)
    blobs = [fetcher.fetch(task["data"][targets.data_key], task.get("id")) for task in tasks]
    out: list[dict[str, Any]] = []
    for start in range(0, len(blobs), batch):
        out += [prediction(targets, found, settings)
                for found in explain_maps(blobs[start:start + batch], settings, client, deadline)]
    return out
