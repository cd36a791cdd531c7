"""Saliency maps as FiftyOne `Heatmap` fields (float maps, range [0, 1]), with the explained class and, when
asked, the map's faithfulness metrics as float fields to sort and filter by.

A detection model's answer (D-RISE of `mtcnn`, say) is stored as `fo.Detections` (one `fo.Detection` per box,
its `mask` the most salient region of its map within the box) and one `fo.Heatmap` field per detection
(`<field>_map<i>`, the whole float map): FiftyOne's App draws a Heatmap only as a sample-level field (a
Detection's attributes are shown as values, never as an overlay), and a Detection's instance mask only
inside its box; see add_saliency."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import fiftyone.core.fields as fof
import fiftyone.core.labels as fol
import numpy as np

from saliency_client import (
    AnyExplanation,
    Client,
    Detection,
    ImageDetections,
    ImageExplanation,
    PayloadTooLargeError,
    ValidationError,
    salient_region_in_box,
)

__all__ = ["to_heatmap", "to_classification", "to_detections", "add_saliency", "METRIC_FIELDS"]

# With metrics=True: `<field>_<name>` for each, a float (None where the service gives null: stability is only
# measured for the stochastic methods, SmoothGrad and MoreauGrad). The AUCs are of the explained class's
# softmax probability over x in [0, 1] as the map's pixels are removed (deletion) or restored (insertion); a
# faithful map has deletion_auc well below deletion_auc_random and insertion_auc above insertion_auc_random.
METRIC_FIELDS = {
    "deletion_auc": "deletion AUC of the map's order (lower than deletion_auc_random: the map ranks the "
                    "pixels the model uses first)",
    "insertion_auc": "insertion AUC of the map's order (higher than insertion_auc_random: faithful)",
    "deletion_auc_random": "deletion AUC of a random order of the same pixels (the baseline)",
    "insertion_auc_random": "insertion AUC of a random order of the same pixels (the baseline)",
    "stability": "Spearman correlation of the maps of two halves of a stochastic method's draws (None for "
                 "deterministic methods)",
}


def to_heatmap(result: ImageExplanation | Detection) -> fol.Heatmap:
    """The float32 map itself (no 8-bit rounding); the App stretches it over the image."""
    if result.map is None:
        raise ValueError("the result has no float map: ask for the 'npy' output")
    return fol.Heatmap(map=np.asarray(result.map, dtype=np.float32), range=[0.0, 1.0])


def to_classification(result: ImageExplanation) -> fol.Classification:
    return fol.Classification(label=result.label, confidence=result.probability)


def to_detection(d: Detection, width: int, height: int, threshold: float = 0.5,
                 heatmap_field: str | None = None) -> fol.Detection:
    """One detection: its box relative to the image ([x, y, w, h] in [0, 1]: FiftyOne's frame, whatever the
    map's size), the detector's score as confidence, and as instance mask the most salient region of its map
    within the box (saliency_client.salient_region_in_box at `threshold` of the box's peak), which the App
    fills in the detection's colour. `heatmap_field` names the sample field holding its whole map."""
    if d.map is None:
        raise ValueError("the detection has no float map: ask for the 'npy' output")
    x1, y1, x2, y2 = d.box
    sx, sy = d.map.shape[1] / width, d.map.shape[0] / height  # the map's pixels per upload pixel
    region = salient_region_in_box(d.map, (x1 * sx, y1 * sy, x2 * sx, y2 * sy), threshold)
    # the mask spans the box's pixels of the map (rounded outward, as salient_region_in_box crops)
    mx1, my1 = max(int(np.floor(x1 * sx)), 0), max(int(np.floor(y1 * sy)), 0)
    mx2, my2 = max(min(int(np.ceil(x2 * sx)), d.map.shape[1]), mx1 + 1), max(min(int(np.ceil(y2 * sy)),
                                                                               d.map.shape[0]), my1 + 1)
    found = fol.Detection(label=d.label, bounding_box=[x1 / width, y1 / height, (x2 - x1) / width,
                                                       (y2 - y1) / height],
                          confidence=d.score, mask=region.mask[my1:my2, mx1:mx2])
    if heatmap_field is not None:
        found["heatmap_field"] = heatmap_field
    return found


def to_detections(result: ImageDetections, field: str = "saliency",
                  threshold: float = 0.5) -> tuple[fol.Detections, dict[str, fol.Heatmap]]:
    """A detector's answer for one image: fo.Detections for `<field>`, and the Heatmap fields
    `<field>_map<i>` (one per detection, in the same order; each Detection names its own)."""
    heatmaps = {f"{field}_map{i}": to_heatmap(d) for i, d in enumerate(result)}
    detections = [to_detection(d, result.width, result.height, threshold, name)
                  for d, name in zip(result, heatmaps, strict=True)]
    return fol.Detections(detections=detections), heatmaps


def _batches(samples: Iterable[Any], size: int):
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# 413s that fewer images per request avoid: the answer's bound, the pixels or the number of images per request
SPLITTABLE = ("response_too_large", "too_many_pixels", "too_many_images")


def _explain(client: Client, paths: list[str], method: str, model: str | None, size: str,
             params: dict[str, Any], outputs: list[str]) -> list[ImageExplanation | ImageDetections]:
    """The float maps of `paths`, in order: a batch the service refuses as too large (its max_response_bytes
    bounds an answer; a float32 map at the original size takes 5.3 bytes per pixel) or too costly (422
    too_costly: a request's passes grow with its images, and the metrics add 4(K-1)+1 forward passes to each)
    is split in halves. One image whose map alone is too large raises: the service's message names what fits
    (size="input")."""
    try:
        explanation: AnyExplanation = client.explain(paths, method, model=model, outputs=outputs, size=size,
                                                     params=params)
    except (PayloadTooLargeError, ValidationError) as exc:
        split = exc.code in SPLITTABLE if isinstance(exc, PayloadTooLargeError) else exc.code == "too_costly"
        if len(paths) < 2 or not split:
            raise
        half = (len(paths) + 1) // 2
        return (_explain(client, paths[:half], method, model, size, params, outputs)
                + _explain(client, paths[half:], method, model, size, params, outputs))
    return list(explanation)


def _declare_metric_fields(sample: Any, field: str, declared: set[str]) -> None:
    """Declare the metric fields as FloatField on the sample's dataset (once per dataset): FiftyOne infers a
    new field's type from the first value written, and cannot from None (a deterministic method's
    stability). An in-memory sample needs nothing declared."""
    dataset = sample.dataset if getattr(sample, "in_dataset", False) else None
    if dataset is None or dataset.name in declared:
        return
    for name, description in METRIC_FIELDS.items():  # add_sample_field: only if not there already
        dataset.add_sample_field(f"{field}_{name}", fof.FloatField, description=description)
    declared.add(dataset.name)


def add_saliency(samples: Iterable[Any], client: Client, field: str = "saliency", method: str = "gradcam",
                 model: str | None = None, batch_size: int = 8, size: str = "input",
                 params: Mapping[str, Any] | None = None, metrics: bool = False, mask_threshold: float = 0.5,
                 **more: Any) -> int:
    """Explain each sample's image and store `<field>` (Heatmap) and `<field>_class` (the explained class).

    `samples` is a dataset or view (saved as it goes) or any iterable of fo.Sample. Method parameters are
    keyword arguments or `params=`. Returns how many were done.

    `size="input"` (the default) stores each map at the model's input size (224 x 224 for the default model),
    which the App stretches over the image: the service resizes the whole photo to that size (no crop), so the
    map lines up. `size="original"` stores it at the photo's own size, as float32: a sample is one MongoDB
    document, capped at 16 MiB, and a map of about 5 megapixels or more no longer fits. A batch whose answer
    the service refuses as too large (413: its max_response_bytes) is sent again in halves.

    `metrics=True` also asks the service to measure each map (outputs "metrics", at its defaults: 20 steps,
    blur substrate; 77 forward passes more per image) and stores `<field>_deletion_auc`,
    `<field>_insertion_auc`, `<field>_deletion_auc_random`, `<field>_insertion_auc_random` and
    `<field>_stability` (METRIC_FIELDS), floats or None, to sort or filter by, e.g.
    `dataset.sort_by(F("gradcam_deletion_auc") - F("gradcam_deletion_auc_random"))`: the most faithful first.

    A detection model (`method="drise", model="mtcnn"`) stores `<field>` as fo.Detections, one fo.Detection
    per box (relative [x, y, w, h], label, the detector's score as confidence, and as its instance mask the
    most salient region of its map within the box at `mask_threshold`), and each detection's whole float map
    as the Heatmap field `<field>_map<i>` (named by the detection's `heatmap_field` attribute). Why both: the
    App overlays a Heatmap only as a sample field, and a Detection's mask only inside its box; the mask shows
    which part of the box drove the detection, the Heatmap also the context outside it. A sample has as many
    `_map<i>` fields as it has detections (at most the method's max_detections, 20 by default).
    """
    if hasattr(samples, "iter_samples"):  # a dataset or view: batch its writes to the database
        samples = samples.iter_samples(autosave=True, batch_size=batch_size)
    outputs = ["npy", "metrics"] if metrics else ["npy"]
    declared: set[str] = set()
    done = 0
    for batch in _batches(samples, batch_size):
        paths = [s.filepath for s in batch]
        results = _explain(client, paths, method, model, size, {**(params or {}), **more}, outputs)
        for sample, result in zip(batch, results, strict=True):
            if isinstance(result, ImageDetections):
                if metrics:
                    raise ValueError("metrics=True measures a classifier's map; a detector's answer has none")
                detections, heatmaps = to_detections(result, field, mask_threshold)
                sample[field] = detections
                for name, heatmap in heatmaps.items():
                    sample[name] = heatmap
                continue
            sample[field] = to_heatmap(result)
            sample[f"{field}_class"] = to_classification(result)
            if metrics:
                if result.metrics is None:
                    raise ValueError("the service answered without the map's metrics (outputs=metrics)")
                _declare_metric_fields(sample, field, declared)
                for name in METRIC_FIELDS:
                    value = result.metrics.get(name)
                    sample[f"{field}_{name}"] = None if value is None else float(value)
        done += len(batch)
    return done
