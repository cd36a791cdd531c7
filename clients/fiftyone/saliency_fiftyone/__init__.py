"""Saliency maps as FiftyOne `Heatmap` fields (float maps, range [0, 1]), with the explained class."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import fiftyone.core.labels as fol
import numpy as np

from saliency_client import Client, Explanation, ImageExplanation, PayloadTooLargeError

__all__ = ["to_heatmap", "to_classification", "add_saliency"]


def to_heatmap(result: ImageExplanation) -> fol.Heatmap:
    """The float32 map itself (no 8-bit rounding); the App stretches it over the image."""
    if result.map is None:
        raise ValueError("the result has no float map: ask for the 'npy' output")
    return fol.Heatmap(map=np.asarray(result.map, dtype=np.float32), range=[0.0, 1.0])


def to_classification(result: ImageExplanation) -> fol.Classification:
    return fol.Classification(label=result.label, confidence=result.probability)


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
             params: dict[str, Any]) -> list[ImageExplanation]:
    """The float maps of `paths`, in order: a batch the service refuses as too large (its max_response_bytes
    bounds an answer; a float32 map at the original size takes 5.3 bytes per pixel) is split in halves. One
    image whose map alone is too large raises: the service's message names what fits (size="input")."""
    try:
        explanation: Explanation = client.explain(paths, method, model=model, outputs=["npy"], size=size,
                                                  params=params)
    except PayloadTooLargeError as exc:
        if len(paths) < 2 or exc.code not in SPLITTABLE:
            raise
        half = (len(paths) + 1) // 2
        return (_explain(client, paths[:half], method, model, size, params)
                + _explain(client, paths[half:], method, model, size, params))
    return list(explanation)


def add_saliency(samples: Iterable[Any], client: Client, field: str = "saliency", method: str = "gradcam",
                 model: str | None = None, batch_size: int = 8, size: str = "input",
                 params: Mapping[str, Any] | None = None, **more: Any) -> int:
    """Explain each sample's image and store `<field>` (Heatmap) and `<field>_class` (the explained class).

    `samples` is a dataset or view (saved as it goes) or any iterable of fo.Sample. Method parameters are
    keyword arguments or `params=`. Returns how many were done.

    `size="input"` (the default) stores each map at the model's input size (224 x 224 for the default model),
    which the App stretches over the image: the service resizes the whole photo to that size (no crop), so the
    map lines up. `size="original"` stores it at the photo's own size, as float32: a sample is one MongoDB
    document, capped at 16 MiB, and a map of about 5 megapixels or more no longer fits. A batch whose answer
    the service refuses as too large (413: its max_response_bytes) is sent again in halves.
    """
    if hasattr(samples, "iter_samples"):  # a dataset or view: batch its writes to the database
        samples = samples.iter_samples(autosave=True, batch_size=batch_size)
    done = 0
    for batch in _batches(samples, batch_size):
        paths = [s.filepath for s in batch]
        results = _explain(client, paths, method, model, size, {**(params or {}), **more})
        for sample, result in zip(batch, results, strict=True):
            sample[field] = to_heatmap(result)
            sample[f"{field}_class"] = to_classification(result)
        done += len(batch)
    return done
