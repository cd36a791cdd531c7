"""Tasks -> Label Studio predictions: a brushlabels region carrying the saliency, a box around its most
salient region (saliency_client.salient_region); scored by the class probability or the map's faithfulness.

A detection model (task "detection": the service answers per detection) gives per detection a rectanglelabels
region (its box) and a brushlabels region (its map), both with the detection's label, linked by a relation;
scored by the detection's score."""
from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface
from PIL import ExifTags, Image

from saliency_client import (
    APIStatusError,
    Client,
    Detection,
    DetectionExplanation,
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
    labels: tuple[str, ...] = field(default=(), compare=False)  # every <Label> of the control

    def label_for(self, name: str) -> str:
        """A detection's label as this control spells it: the same name when the control has it, else its
        chosen label (Label Studio shows a region whose label the config lacks, but cannot edit it)."""
        return name if name in self.labels else self.label


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
            found[tag] = Control(from_name, to_name, chosen, tuple(labels))
            data_key = data_key or key
        if not found:
            raise ConfigError("the label config needs a <BrushLabels> or <RectangleLabels> on an <Image>")
        return cls(data_key, found.get("BrushLabels"), found.get("RectangleLabels"))


def brush_region(ctl: Control, heat: np.ndarray, score: float, note: str | None = None,
                 label: str | None = None, region_id: str | None = None) -> dict[str, Any]:
    """The map as Label Studio's brush RLE: 0-255 in every RGBA channel,
    so it shows as graded opacity. `note`: the region's meta text (shown in its details in the editor)."""
    h, w = heat.shape
    levels = np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8)
    region = {"id": region_id or uuid.uuid4().hex[:10], "from_name": ctl.from_name, "to_name": ctl.to_name,
              "type": "brushlabels", "original_width": w, "original_height": h, "image_rotation": 0,
              "score": score,
              "value": {"format": "rle", "rle": brush.mask2rle(levels), "brushlabels": [label or ctl.label]}}
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


def detection_box_region(ctl: Control, d: Detection, size: tuple[int, int], region_id: str,
                         note: str) -> dict[str, Any]:
    """A detection's box as a rectanglelabels region: x, y, width, height in percent of the photo, whose
    (width, height) is `size` (the service's boxes are in its pixels)."""
    w, h = size
    x1, y1, x2, y2 = d.box
    return {"id": region_id, "from_name": ctl.from_name, "to_name": ctl.to_name, "type": "rectanglelabels",
            "original_width": w, "original_height": h, "image_rotation": 0, "score": d.score,
            "meta": {"text": [note]},
            "value": {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w,
                      "height": 100 * (y2 - y1) / h, "rotation": 0,
                      "rectanglelabels": [ctl.label_for(d.label)]}}


class Detected(NamedTuple):
    """One photo's answer from a detection model: (width, height) of the photo, each detection with its map at
    that size (float32 in [0, 1]), and the model that made them."""

    size: tuple[int, int]
    detections: list[tuple[Detection, np.ndarray]]
    model: str


def detection_prediction(targets: Targets, found: Detected, settings: BackendSettings) -> dict[str, Any]:
    """Per detection its box (rectanglelabels) and its map (brushlabels), with the detection's label where the
    config has it, each scored by the detection's score; the two regions share an id stem (`<stem>` and
    `<stem>-map`) and a relation from box to map, so the editor shows which map explains which box.

    The prediction's score is the lowest detection score: Label Studio sorts tasks by it, and the least sure
    box is the one a person should check first. An image where nothing was found scores 0 (a person should
    look for what the detector missed)."""
    regions: list[dict[str, Any]] = []
    for index, (d, heat) in enumerate(found.detections):
        stem = f"det{index}-{uuid.uuid4().hex[:6]}"
        note = f"detection {index}: {d.label} score {d.score:.3f}, box {[round(v, 1) for v in d.box]} px"
        if targets.box:
            regions.append(detection_box_region(targets.box, d, found.size, stem, note))
        if targets.brush:
            regions.append(brush_region(targets.brush, heat, d.score, note, targets.brush.label_for(d.label),
                                        f"{stem}-map"))
        if targets.box and targets.brush:
            regions.append({"id": f"{stem}-rel", "type": "relation", "from_id": stem, "to_id": f"{stem}-map",
                            "direction": "right"})
    score = min((d.score for d, _ in found.detections), default=0.0)
    return {"model_version": settings.model_version(found.model), "score": score, "result": regions}


class Explained(NamedTuple):
    """One photo's answer: the map at the photo's size, the explained class and its probability, the model
    that made it (the explain answer names it), and the map's metrics when they were asked for."""

    heat: np.ndarray
    label: str
    probability: float
    model: str
    metrics: dict[str, Any] | None = None


def prediction(targets: Targets, found: Explained | Detected, settings: BackendSettings) -> dict[str, Any]:
    """A task's prediction (a detection model's: detection_prediction). Its score (and each region's) is the
    class probability, or with score_by="faithfulness" the map's faithfulness score (faithfulness.py), whose
    raw figures go into each region's meta text: Label Studio keeps a result's `meta` and shows its `text` in
    the region's details."""
    if isinstance(found, Detected):
        return detection_prediction(targets, found, settings)
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


def png_map(png: Image.Image | None) -> np.ndarray:
    """The 8-bit PNG map as float32 in [0, 1]: the brush's levels are exactly the PNG's (both round the map x
    255), and the box moves by at most a level's rounding."""
    assert png is not None  # explain() asks for the "png" output
    return np.asarray(png.convert("L"), dtype=np.float32) / np.float32(255.0)


def detected(explanation: DetectionExplanation) -> list[Detected]:
    """Each photo's detections with their maps at the photo's size (a map at the image explained, size=input,
    is resized to it as the service would have)."""
    out = []
    for r in explanation:
        maps = []
        for d in r:
            heat = png_map(d.png)
            if heat.shape != (r.height, r.width):
                heat = resized(heat, (r.width, r.height))
            maps.append((d, heat))
        out.append(Detected((r.width, r.height), maps, explanation.model))
    return out


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
                 deadline: float) -> list[Explained | Detected]:
    """Each blob's map at the photo's size with its class, probability, model (and metrics), in order.

    Label Studio decodes the brush RLE into an image of the photo's own size, so the maps come at the original
    size, as 8-bit PNGs: the brush holds 8-bit levels anyway, and a PNG takes at most 1.34 bytes per pixel in
    the answer where a float32 .npy takes 5.3 (the service refuses an answer over its max_response_bytes).
    A batch still refused as too large (or too costly: see splittable) is split in halves; a single photo
    whose map alone is too large gets the map at the model input, resized here as the service would have: the
    same map, so every task still gets its prediction rather than an error a labeling team could do nothing
    about. With score_by="faithfulness" the service also measures each map (outputs "metrics"). A detection
    model's answer comes back as Detected (its maps at the photo's size the same way)."""
    outputs = ["png", "metrics"] if settings.score_by == "faithfulness" else ["png"]

    def call(chunk: list[bytes], size: str):
        return client.explain(chunk, settings.method, model=settings.model, outputs=outputs, size=size,
                              params=settings.params, timeout=max(deadline - time.monotonic(), 1e-3))

    out: list[Explained | Detected] = []
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
        if isinstance(explanation, DetectionExplanation):
            out += detected(explanation)
            return out
        out += [Explained(resized(png_map(r.png), photo_size(blob)), r.label, r.probability,
                          explanation.model, r.metrics) for blob, r in zip(blobs, explanation, strict=True)]
        return out
    if isinstance(explanation, DetectionExplanation):
        out += detected(explanation)
        return out
    out += [Explained(png_map(r.png), r.label, r.probability, explanation.model, r.metrics)
            for r in explanation]
    return out


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
