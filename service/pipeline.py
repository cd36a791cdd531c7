"""The stages of one explain call: resolve -> prepare (decode, validate) -> (batch on a backend) -> encode.

Only the call lifecycle (service/runtime.py) calls them. Decoding and encoding run in request threads or the
encoder pool, never on a thread that runs passes.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pybase64
import torch
from PIL import Image
from pydantic import ValidationError

from . import imaging
from .cache import content_hash
from .engine import ImageExplanation, check_targets
from .errors import BadInput, InvalidInput, NotFound, TooLarge, describe_validation
from .evidence.spec import MetricsParams
from .methods import Method, MethodParams, get_method
from .settings import Settings
from .zoo import LoadedModel, ModelRegistry


@dataclass
class CallRequest:
    """What a caller asked for, in either request form (the API parses multipart and JSON into it)."""

    model: str | None
    blobs: list[bytes]
    targets: list[int | None] | None
    params: dict[str, Any]
    outputs: list[str]
    size: str
    metrics: dict[str, Any] | None = None  # the per-map metrics' parameters as given (steps, replacement)


@dataclass
class Call:
    """A validated request: everything the worker and the encoder need."""

    model: LoadedModel
    method: Method
    params: MethodParams
    uploads: list[imaging.Upload]
    blobs: list[bytes]  # the files as uploaded: a reduced decode is decoded again whole for its overlay
    pixels: torch.Tensor  # (B, 3, H, W) in model-input space, on the CPU
    hashes: list[str]  # content hash of each uploaded file (the result cache's key)
    targets: list[int | None]
    outputs: set[str]
    size: str
    metrics: MetricsParams | None = None  # asked for with outputs=metrics
    cost: int = field(init=False)

    def __post_init__(self):
        self.cost = self.passes_per_image * len(self.uploads)

    @property
    def passes_per_image(self) -> int:
        """The method's forward+backward passes, and the per-map metrics' forwards counted as passes (a
        forward alone costs about a third of one: an upper bound, for admission and the cost limit)."""
        return passes_per_image(self.method, self.params, self.metrics)

    @property
    def upload_pixels(self) -> int:
        """Pixels of the uploads at their full size: what the call may hold decoded (an overlay at the
        original size decodes a reduced upload again, whole)."""
        return sum(width * height for width, height in (u.size for u in self.uploads))

    def original_size(self, index: int) -> tuple[int, int] | None:
        """(height, width) the map of image `index` is returned at, when that is the uploaded image's size."""
        width, height = self.uploads[index].size
        return (height, width) if self.size == "original" else None

    def overlay_base(self, index: int, size: tuple[int, int]) -> Image.Image:
        """The upload at `size` (width, height) for an overlay: as decoded when that is its size, else the
        reduced decode resized (input-size maps), else the file decoded again whole (original-size maps)."""
        upload = self.uploads[index]
        if upload.image.size == size:
            return upload.image
        if upload.reduced and size == upload.size:
            blob = self.blobs[index]
            return imaging.decode_image(blob, max_bytes=len(blob), max_pixels=size[0] * size[1], index=index)
        return upload.image.resize(size, reducing_gap=imaging.REDUCING_GAP)


def resolve(registry: ModelRegistry, settings: Settings, model_name: str | None, method_name: str,
            raw_params: dict[str, Any]) -> tuple[LoadedModel, Method, MethodParams]:
    try:
        method = get_method(method_name)
    except LookupError as exc:
        raise NotFound(str(exc), code="unknown_method") from None
    try:
        model = registry.get(model_name or settings.default_model)
    except LookupError as exc:
        raise NotFound(str(exc), code="unknown_model") from None
    try:
        params = method.Params.model_validate(raw_params)
    except ValidationError as exc:
        raise InvalidInput(f"{method.name}: {describe_validation(exc.errors())}",
                           code="invalid_params") from None
    if (params.precision not in (None, "fp32") and model.device.type == "cpu"
            and not settings.cpu_reduced_precision):
        raise InvalidInput(f"{method.name}: precision {params.precision} is for GPUs; {model.name} runs on "
                           f"the CPU, where reduced precision is many times slower than fp32 (the server's "
                           f"cpu_reduced_precision setting allows it)", code="invalid_params")
    if params.precision is None:  # fill in the server's default: batch keys, cache keys and echoes say it
        params = params.model_copy(update={"precision": settings.precision})
    method.check_model(model, params)
    return model, method, params


def passes_per_image(method: Method, params: MethodParams, metrics: MetricsParams | None) -> int:
    """The method's passes; with the per-map metrics, their forwards (counted as passes) and, for a method
    with an independent draw to measure its map's stability against (`Method.redraw`), that draw's passes."""
    if metrics is None:
        return method.cost(params)
    redraw = method.redraw(params)
    return method.cost(params) + metrics.forwards + (0 if redraw is None else method.cost(redraw))


def resolve_metrics(outputs: list[str], given: dict[str, Any] | None) -> MetricsParams | None:
    """The per-map metrics' parameters when `metrics` is among the outputs; given without it, refused."""
    if "metrics" not in outputs:
        if given:
            raise InvalidInput(f"metrics parameters ({', '.join(sorted(given))}) given, but 'metrics' is not "
                               f"among the outputs: add it (outputs=...,metrics)", code="invalid_metrics")
        return None
    try:
        return MetricsParams.model_validate(given or {})
    except ValidationError as exc:
        raise InvalidInput(f"metrics: {describe_validation(exc.errors())}", code="invalid_metrics") from None


def check_counts(settings: Settings, n_images: int, targets: list[int | None] | None) -> list[int | None]:
    if n_images == 0:
        raise InvalidInput("no images in the request (multipart field 'image' or JSON 'images')",
                           code="no_images")
    if n_images > settings.max_images:
        raise TooLarge(f"{n_images} images; the limit is {settings.max_images} per request",
                       code="too_many_images")
    if targets is None:
        return [None] * n_images
    if len(targets) == 1 and n_images > 1:
        return targets * n_images
    if len(targets) != n_images:
        raise InvalidInput(f"{len(targets)} targets for {n_images} images", code="invalid_targets")
    return targets


def prepare(settings: Settings, model: LoadedModel, method: Method, params: MethodParams,
            request: CallRequest, outputs: list[str]) -> Call:
    """Validate counts, targets and cost, decode and preprocess (CPU work: run it in a thread)."""
    blobs = request.blobs
    targets = check_counts(settings, len(blobs), request.targets)
    check_targets(model, targets)
    metrics = resolve_metrics(outputs or ["npy"], request.metrics)
    cost = passes_per_image(method, params, metrics) * len(blobs)
    if cost > settings.max_request_cost:
        extra = f" (the metrics' {metrics.forwards} forwards an image included)" if metrics else ""
        raise InvalidInput(f"this request costs {cost} forward+backward passes{extra}; the limit is "
                           f"{settings.max_request_cost} per request", code="too_costly")
    # The request's total, from the headers: refused before anything is decoded. An image over its own limits
    # is left to decode_image, whose message names that image.
    dims = [imaging.declared_size(blob) for blob in blobs]
    sizes = [width * height for width, height in dims]
    declared = sum(sizes)
    each_within = all(len(blob) <= settings.max_image_bytes and size <= settings.max_image_pixels
                      for blob, size in zip(blobs, sizes, strict=True))
    if declared > settings.max_request_pixels and each_within:
        raise TooLarge(f"the {len(blobs)} images of this request hold {declared} pixels; the limit is "
                       f"{settings.max_request_pixels} per request: send fewer or smaller images per request",
                       code="too_many_pixels")
    if each_within:  # and the answer's size, bounded from the same headers, before any work
        AnswerBound(model, method.name, params, settings.top_k, dims).check(
            set(outputs or ["npy"]), request.size, settings.max_response_bytes)
    uploads = []
    for i, blob in enumerate(blobs):
        try:
            uploads.append(imaging.decode_upload(blob, max_bytes=settings.max_image_bytes,
                                                 max_pixels=settings.max_image_pixels,
                                                 min_side=model.preprocess.decode_side, index=i))
        except imaging.ImageError as exc:
            kind = TooLarge if "exceeds" in str(exc) else BadInput
            raise kind(str(exc), code="bad_image") from None
    pixels = model.preprocess.batch([u.image for u in uploads])
    return Call(model, method, params, uploads, list(blobs), pixels, [content_hash(b) for b in blobs],
                targets, set(outputs or ["npy"]), request.size, metrics)


# --- the answer's size, bounded before any work runs ------------------------------------------------------

NPY_HEADER = 128  # np.save pads its header to a multiple of 64 bytes: 128 for a 2-D or 3-D float32 array
_PNG_FIXED = 1024  # signature, IHDR, IEND, zlib's header and checksum
_ENTRY = 2048  # an image's entry besides its maps and labels: target, probabilities, diagnostics, timings
_CLASS = 64  # a top_k entry besides its label
_BODY = 512  # the body besides its results and parameters: keys, model and method names


def _amount(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{max(1, round(n / 1e3))} KB"


def b64_len(n: int) -> int:
    """Characters of `n` bytes in padded base64."""
    return 4 * -(-n // 3)


def png_bound(width: int, height: int, channels: int) -> int:
    """Most bytes an 8-bit PNG of this size can take whatever its pixels: its raw rows with a filter byte
    each (either way up: the map of an EXIF-turned image is turned too), and zlib's worst case, which stores a
    block it cannot shrink (5 bytes per block of at most 64 KB), in IDAT chunks of 12 bytes' overhead each."""
    raw = width * height * channels + max(width, height)
    return raw + raw // 1000 + _PNG_FIXED


def map_bytes(width: int, height: int, outputs: Collection[str]) -> int:
    """The most characters a width x height map takes in base64 in the answer, in the outputs asked for: 4
    bytes a pixel as float32 .npy (+ its header), at most 1 as a gray PNG and 3 as an overlay PNG."""
    total = 0
    if "npy" in outputs:
        total += b64_len(NPY_HEADER + 4 * width * height)
    if "png" in outputs:
        total += b64_len(png_bound(width, height, 1))
    if "overlay" in outputs:
        total += b64_len(png_bound(width, height, 3))
    return total


@dataclass(frozen=True)
class AnswerBound:
    """An upper bound on the bytes of a call's answer as sent (its JSON: every map in base64), from what is
    known before any work runs: the images' sizes from their headers, the outputs and the size asked for.

    Per image: a map of height x width (the upload's, or the model input's with size=input) takes, before
    base64's 4/3, 4 bytes per pixel as float32 .npy (+ its header), at most 1 byte per pixel (+ a filter byte
    per row and zlib's worst case) as a gray PNG and 3 as an overlay PNG; `raw` is the signed attribution at
    the model input, at most 3 channels of float32. The PNGs' bound holds for noise; a smooth map compresses
    far below it. The .npy bound is exact but for the JSON around it."""

    model: LoadedModel
    method: str
    params: MethodParams
    top_k: int
    images: list[tuple[int, int]]  # (width, height) of each upload, as its header declares

    def map_size(self, index: int, size: str) -> tuple[int, int]:
        """(width, height) of image `index`'s map at `size` (as stored: an EXIF turn swaps the two)."""
        if size == "original":
            return self.images[index]
        height, width = self.model.input_size
        return width, height

    def image_bytes(self, index: int, outputs: Collection[str], size: str) -> int:
        width, height = self.map_size(index, size)
        total = map_bytes(width, height, outputs)
        if "metrics" in outputs:  # four curves of at most 101 points, 25 characters each, and their figures
            total += 4 * 101 * 25 + 1024
        if "raw" in outputs:
            in_height, in_width = self.model.input_size
            total += b64_len(NPY_HEADER + 3 * 4 * in_width * in_height)
        # JSON writes a label's control characters as 6-byte escapes; any other character takes at most 4
        label = 6 * max((len(name) for name in self.model.labels), default=0)
        return total + _ENTRY + (min(self.top_k, self.model.num_classes) + 1) * (label + _CLASS)

    def total(self, outputs: Collection[str], size: str, images: Collection[int] | None = None) -> int:
        """The bound for the images `images` (default all) with these outputs at this size."""
        chosen = range(len(self.images)) if images is None else images
        params = len(json.dumps(self.params.model_dump()))  # ASCII escapes: never shorter than the UTF-8 sent
        return (_BODY + 6 * (len(self.model.name) + len(self.method)) + params
                + sum(self.image_bytes(i, outputs, size) for i in chosen))

    def check(self, outputs: set[str], size: str, limit: int) -> None:
        """TooLarge (413 response_too_large) when the bound passes `limit`, naming the requests that fit."""
        estimate = self.total(outputs, size)
        if estimate <= limit:
            return
        n = len(self.images)
        biggest = max(range(n), key=lambda i: self.images[i][0] * self.images[i][1])
        width, height = self.map_size(biggest, size)
        what = (f"{n} image{'s' if n > 1 else ''}, {'the largest ' if n > 1 else ''}{width}x{height} at size="
                f"{size}, outputs={','.join(sorted(outputs))}")
        raise TooLarge(f"the answer to this request would take up to {_amount(estimate)} ({what}; maps in "
                       f"base64); the limit is {_amount(limit)} (the server's max_response_bytes "
                       f"setting). {self._alternatives(outputs, size, limit)}", code="response_too_large")

    def _alternatives(self, outputs: set[str], size: str, limit: int) -> str:
        """The cheaper requests that would fit, each with its bound."""
        fits = []
        if size == "original" and (estimate := self.total(outputs, "input")) <= limit:
            fits.append(f"size=input (maps at the model input, {self.model.input_size[1]}x"
                        f"{self.model.input_size[0]}) would answer at most {_amount(estimate)}")
        if "npy" in outputs:
            cheaper = (outputs - {"npy"}) | {"png"}
            if (estimate := self.total(cheaper, size)) <= limit:
                fits.append(f"outputs={','.join(sorted(cheaper))} (an 8-bit PNG map instead of float32 npy) "
                            f"would answer at most {_amount(estimate)}")
        n = len(self.images)
        if n > 1:
            by_size = sorted(range(n), key=lambda i: self.image_bytes(i, outputs, size), reverse=True)
            k = 0  # any k of these images fit when the k largest do
            while k < n and self.total(outputs, size, by_size[:k + 1]) <= limit:
                k += 1
            if k:
                most = self.total(outputs, size, by_size[:k])
                fits.append(f"{k} of these images per request would answer at most {_amount(most)} each")
        if not fits:
            return "Send smaller images, or fewer outputs, at size=input."
        return "Would fit: " + "; or ".join(fits) + "."


def _b64(data: bytes) -> str:
    # pybase64 (SIMD): every JSON answer carries its maps in base64; many times the standard library's speed.
    return pybase64.b64encode_as_string(data)


def encode_result(call: Call, index: int, result: ImageExplanation, queue_ms: float,
                  compute_ms: float) -> dict[str, Any]:
    """One image's entry of the response (JSON-ready)."""
    heat = result.heatmap.numpy()
    size = call.original_size(index)
    if size is not None and heat.shape != size:
        sized = result.sized_heatmap  # resized by the worker; None from the cache of a size=input call
        heat = (sized.numpy() if sized is not None and sized.shape == size
                else imaging.resize_map(heat, (size[1], size[0])))
    out_map: dict[str, Any] = {"height": heat.shape[0], "width": heat.shape[1]}
    if "npy" in call.outputs:
        out_map["npy"] = _b64(imaging.encode_npy(heat))
    if "png" in call.outputs:
        out_map["png"] = _b64(imaging.encode_png_gray(heat))
    if "overlay" in call.outputs:
        base = call.overlay_base(index, (heat.shape[1], heat.shape[0]))
        out_map["overlay"] = _b64(imaging.encode_png(imaging.overlay(base, heat), photo=True))
    entry = {
        "target": result.target, "label": result.label, "probability": result.probability,
        "top_k": [{"index": c.index, "label": c.label, "probability": c.probability} for c in result.top_k],
        "map": out_map, "diagnostics": result.diagnostics,
        "timing_ms": {"queue": round(queue_ms, 3), "compute": round(compute_ms, 3)},
    }
    if "metrics" in call.outputs and result.metrics is not None:
        entry["metrics"] = result.metrics
    if "raw" in call.outputs and result.attribution is not None:  # kept by the engine when raw was asked for
        entry["raw"] = _b64(imaging.encode_npy(result.attribution.numpy().astype(np.float32)))
    return entry


def response_body(call: Call, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": call.model.name, "method": call.method.name, "task": "classification",
            "params": call.params.model_dump(), "results": results}

