"""A call to a detection model, from the parsed request to the response body (Runtime.start_call hands it
here when the model is a detector).

The images are decoded with the same limits as a classifier's, explained at their own aspect with the longer
side at most the detector's `max_side` (D-RISE runs N masked copies of that image), and answered with the
upload's pixels: boxes scaled back, maps resized to the upload (or left at the image explained with
`size=input`). Each map is encoded as a classifier's is (npy, png, overlay).

The detection calls run on threads of their own, beside the classifier lanes; a D-RISE call is N forwards of
the detector, which go through the D-RISE lane (lane.py): the detector's pass budget of masked images per
forward (budget.py, set at start-up), those of concurrent calls on images of one size with the same masks
batched together.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pybase64
import torch
from pydantic import ValidationError

from .. import imaging
from ..budget import PixelBudget
from ..errors import Busy, Cancelled, InvalidInput, TooLarge, as_service_error, describe_validation
from ..jobs import Job
from ..pipeline import CallRequest, check_counts, map_bytes
from ..settings import Settings
from .admission import DetectionAdmission, SecondsPerPass
from .explain import BOX_GRADCAM, DETECTION_METHODS, DetectionMap, explain_image
from .lane import DriseLane
from .params import DetectionParams, DriseParams
from .zoo import LoadedDetector

# A thread per call in flight (its first forward, target choice, encoding); D-RISE's forwards go through the
# one lane, which batches those of concurrent calls (lane.py).
CALLS_IN_FLIGHT = 4
_EXECUTOR = ThreadPoolExecutor(max_workers=CALLS_IN_FLIGHT, thread_name_prefix="detect")
LANE = DriseLane()


def resolve_params(method: str, detector: LoadedDetector, raw: dict[str, Any]) -> DetectionParams:
    if method not in DETECTION_METHODS:
        raise InvalidInput(f"method {method!r} does not apply to {detector.name}, an object detector: its "
                           f"methods are {sorted(DETECTION_METHODS)}", code="method_not_applicable")
    if method == BOX_GRADCAM and detector.module is None:
        raise InvalidInput(f"gradcam needs the detector's graph; {detector.name} is explained as a black box "
                           "(drise)", code="method_not_applicable")
    try:
        kind: type[DetectionParams] = DETECTION_METHODS[method]
        return kind.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"{method}: {describe_validation(exc.errors())}", code="invalid_params") from None


def steps(method: str, params: DetectionParams) -> int:
    return params.n_masks if isinstance(params, DriseParams) else 1


# (model, method, passes, seconds): the server's recent seconds per pass (service/timings.py), from which the
# viewer estimates a run before it is sent
RecordTiming = Callable[[str, str, int, float], None]


def passes_run(method: str, maps: list[DetectionMap]) -> int:
    """The passes an image's maps took beyond its first forward: D-RISE's masks (fewer than asked where early
    stop ended them; the detections share them), one backward for per-box Grad-CAM; none without a
    detection."""
    if not maps:
        return 0
    if method == BOX_GRADCAM:
        return 1
    return max(int(m.diagnostics.get("n_masks", 0)) for m in maps)


Decoded = list[tuple[torch.Tensor, tuple[int, int]]]  # each image (3, H, W) in [0, 1], its upload's size


def decode(settings: Settings, detector: LoadedDetector, blobs: list[bytes]) -> Decoded:
    """Each upload as (3, H, W) in [0, 1] at most max_side on its longer side, with its (width, height)."""
    out = []
    for index, blob in enumerate(blobs):
        try:
            upload = imaging.decode_upload(blob, max_bytes=settings.max_image_bytes,
                                           max_pixels=settings.max_image_pixels, min_side=detector.max_side,
                                           index=index)
        except imaging.ImageError as exc:
            raise InvalidInput(str(exc), code="invalid_image") from None
        image = upload.image
        width, height = upload.size
        side = max(width, height)
        if side > detector.max_side:
            factor = detector.max_side / side
            image = image.resize((max(1, round(width * factor)), max(1, round(height * factor))),
                                 reducing_gap=imaging.REDUCING_GAP)
        elif image.size != upload.size:
            image = image.resize(upload.size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        out.append((pixels, upload.size))
    return out


_DETECTION = 2048  # a detection's entry besides its map: box, label, score, diagnostics


def check_answer(settings: Settings, detector: LoadedDetector, params: DetectionParams,
                 request: CallRequest) -> None:
    """TooLarge (413) when the answer could pass max_response_bytes: every image with max_detections maps,
    at the upload's size (or the image explained, size=input), from the images' headers before any work."""
    outputs = request.outputs or ["npy"]
    dims = [imaging.declared_size(blob) for blob in request.blobs]

    def bound(at: str, outputs: list[str], per_image: int) -> int:
        sizes = dims if at == "original" else [_explained(w, h, detector.max_side) for w, h in dims]
        return sum(per_image * (_DETECTION + map_bytes(w, h, outputs)) for w, h in sizes)

    limit, n = settings.max_response_bytes, params.max_detections
    if bound(request.size, outputs, n) <= limit:
        return
    fits = []
    if request.size == "original" and bound("input", outputs, n) <= limit:
        fits.append(f"size=input (maps at the image explained, longer side {detector.max_side})")
    if "npy" in outputs and bound(request.size, [o for o in outputs if o != "npy"] + ["png"], n) <= limit:
        fits.append("outputs=png (8-bit maps instead of float32 npy)")
    fewer = next((k for k in range(n - 1, 0, -1) if bound(request.size, outputs, k) <= limit), 0)
    if fewer:
        fits.append(f"max_detections={fewer}")
    raise TooLarge(f"the answer to this request could take {bound(request.size, outputs, n) / 1e6:.1f} MB "
                   f"({n} maps per image at most, max_detections); the limit is {limit / 1e6:.1f} MB (the "
                   f"server's max_response_bytes setting). " + ("Would fit: " + "; or ".join(fits) + "."
                                                                 if fits else "Send smaller images."),
                   code="response_too_large")


def _explained(width: int, height: int, max_side: int) -> tuple[int, int]:
    if not width or not height:  # no readable header: decoding says what is wrong
        return 0, 0
    factor = min(1.0, max_side / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


def _b64(data: bytes) -> str:
    return pybase64.b64encode_as_string(data)


def encode_detection(found: DetectionMap, image: torch.Tensor, size: tuple[int, int], outputs: list[str],
                     at: str) -> dict[str, Any]:
    """One detection of the response: its box in pixels of the upload, its map encoded."""
    width, height = size
    scale = width / image.shape[-1]
    heat = found.heatmap.numpy()
    if at == "original" and heat.shape != (height, width):
        heat = imaging.resize_map(heat, (width, height))
    out_map: dict[str, Any] = {"height": heat.shape[0], "width": heat.shape[1]}
    if "npy" in outputs:
        out_map["npy"] = _b64(imaging.encode_npy(heat.astype(np.float32)))
    if "png" in outputs:
        out_map["png"] = _b64(imaging.encode_png_gray(heat))
    if "overlay" in outputs:
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        from PIL import Image

        base = Image.fromarray(pixels)
        if base.size != (heat.shape[1], heat.shape[0]):
            base = base.resize((heat.shape[1], heat.shape[0]))
        out_map["overlay"] = _b64(imaging.encode_png(imaging.overlay(base, heat), photo=True))
    box = [round(min(max(v * scale, 0.0), float(width if i % 2 == 0 else height)), 2)
           for i, v in enumerate(found.box)]
    return {"box": box, "label": found.label, "label_index": found.label_index, "score": found.score,
            "map": out_map, "diagnostics": found.diagnostics}


def run(settings: Settings, detector: LoadedDetector, method: str, params: DetectionParams,
        request: CallRequest, job: Job, images: Decoded,
        record: RecordTiming | None = None) -> dict[str, Any]:
    """The whole call, on the detection thread."""
    outputs = request.outputs or ["npy"]
    targets = request.targets or [None] * len(images)
    if len(targets) != len(images):
        raise InvalidInput(f"{len(targets)} targets for {len(images)} images", code="invalid_targets")
    results = []
    for index, ((image, size), target) in enumerate(zip(images, targets, strict=True)):
        started = time.monotonic()
        maps = explain_image(detector, method, image, params, target, size, chunk=detector.pass_batch,
                             on_progress=job.progress_for(index), should_stop=job.cancel_event.is_set,
                             run_drise=LANE.run)
        job.progress_for(index)(steps(method, params), steps(method, params))
        if record is not None:
            record(detector.name, method, passes_run(method, maps), time.monotonic() - started)
        results.append({"width": size[0], "height": size[1],
                        "detections": [encode_detection(m, image, size, outputs, request.size) for m in maps],
                        "timing_ms": {"compute": round(1000 * (time.monotonic() - started), 3)}})
    return {"model": detector.name, "method": method, "task": "detection", "params": params.model_dump(),
            "results": results}


async def start(settings: Settings, detector: LoadedDetector, method: str, request: CallRequest, job_book,
                *, hold: bool, admission: DetectionAdmission, record: RecordTiming | None = None,
                pixels: PixelBudget | None = None, seconds_per_pass: SecondsPerPass | None = None) -> Job:
    """Validate and decode (in a request thread), admit (admission.py: Busy when the detection calls
    admitted, or the pixels in flight, are at their limits), then run on a detection thread; the job's task
    awaits it and records the outcome."""
    params = resolve_params(method, detector, request.params)
    check_counts(settings, len(request.blobs), request.targets)
    cost = steps(method, params) * len(request.blobs)
    if cost > settings.max_request_cost:
        raise InvalidInput(f"this request costs {cost} detector forwards (n_masks x images); the limit is "
                           f"{settings.max_request_cost} per request", code="too_costly")
    check_answer(settings, detector, params, request)
    loop = asyncio.get_running_loop()
    images = await loop.run_in_executor(None, decode, settings, detector, request.blobs)
    held = sum(width * height for _, (width, height) in images)  # the uploads' pixels, as a classifier's call
    if pixels is not None and not pixels.hold(held):
        raise Busy(f"the calls in flight hold {pixels.held} pixels of images and this one {held}; the limit "
                   f"is {settings.max_pixels_in_flight}: retry shortly", retry_after=1.0)
    passes = steps(method, params) * len(images)

    def release() -> None:
        admission.release(detector.name, method, len(images), passes)
        if pixels is not None:
            pixels.release(held)

    try:
        admission.admit(detector.name, method, len(images), passes, settings.max_queue,
                       seconds_per_pass or (lambda _model, _method: None))
    except Busy:
        if pixels is not None:
            pixels.release(held)
        raise
    job = Job(method=method, model=detector.name, total=[steps(method, params)] * len(images))
    if hold:
        try:
            await job_book.hold(job)
        except BaseException:
            release()
            raise

    # Submitted at once, and the call counted out when this future is done: it ran, failed, or was cancelled
    # before a thread took it (a running one runs on until its job's cancel event stops it)
    running = _EXECUTOR.submit(run, settings, detector, method, params, request, job, images, record)
    running.add_done_callback(lambda _: release())

    async def complete() -> dict[str, Any]:
        try:
            body = await asyncio.wrap_future(running)
            job.status, job.result = "succeeded", body
            return body
        except BaseException as exc:
            if job.cancelled or isinstance(exc, (asyncio.CancelledError, Cancelled)):
                job.status, job.error = "cancelled", {"code": "cancelled", "message": "the job was cancelled"}
                raise
            error = as_service_error(exc)
            job.status, job.error = "failed", {"code": error.code, "message": error.message}
            raise error from exc
        finally:
            job.finished_at = time.time()
            await asyncio.shield(job_book.finished(job))

    job.task = asyncio.create_task(complete())
    job.task.add_done_callback(lambda t: t.cancelled() or t.exception())
    job.task.add_done_callback(lambda _: running.cancel())  # not yet taken by a thread: never runs
    return job
