"""The D-RISE lane: masked images of concurrent calls batched into the same detector forwards.

Every detection call explains its images on a thread of its own (calls.py); the masks' forwards of D-RISE go
through this one lane, whose single thread owns the detector while they run. When it is free it takes the
oldest waiting image, and with it every waiting image it can share forwards with: same detector, same image
size and the same masks (n_masks, grid, p, seed, early stop), so `drise_batch` runs them as one batch of
images, the detector's pass budget of masked images per forward (`pass_batch`, budget.py; `chunk` overrides
it). A mask depends only on (seed, index) (drise.py), so an image's map
is the same whether it ran alone or beside others.

A caller that stops waiting (cancelled, hung up) does not stop the others of its batch: the batch stops
between forwards only when every image in it is cancelled.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import Cancelled
from .base import Detections
from .drise import DriseSettings, EarlyStop, drise_batch
from .zoo import LoadedDetector

Progress = Callable[[int, int], None]


@dataclass(eq=False)
class Work:
    detector: LoadedDetector
    image: torch.Tensor  # (3, H, W) in [0, 1]
    targets: Detections
    settings: DriseSettings
    early_stop: EarlyStop | None
    progress: Progress | None
    cancelled: Callable[[], bool]
    future: Future = field(default_factory=Future)

    def joins(self, other: Work) -> bool:
        """Whether the two can share forwards: the same detector, image size and masks."""
        return (self.detector is other.detector and self.image.shape == other.image.shape
                and self.settings == other.settings and self.early_stop == other.early_stop)


class DriseLane:
    """`run(...)`: D-RISE of one image, batched with whatever compatible work waits beside it."""

    def __init__(self, chunk: int | None = None, max_images: int = 8):
        self.chunk, self.max_images = chunk, max_images
        self._waiting: list[Work] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []  # images per batch run, the latest few (for tests and metrics)

    def run(self, detector: LoadedDetector, image: torch.Tensor, targets: Detections, settings: DriseSettings,
            early_stop: EarlyStop | None, progress: Progress | None,
            cancelled: Callable[[], bool]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Blocks until the image's maps are done; Cancelled as soon as `cancelled()` says so."""
        if not len(targets):  # nothing to explain: no forward, as drise() does
            return drise_batch(detector.detect, image[None], [targets], detector.num_classes, settings,
                               chunk=self.chunk or detector.pass_batch)[0]
        work = Work(detector, image, targets, settings, early_stop, progress, cancelled)
        with self._ready:
            self._waiting.append(work)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="drise-lane", daemon=True)
                self._thread.start()
            self._ready.notify()
        while True:
            try:
                return work.future.result(timeout=0.1)
            except TimeoutError:
                if cancelled():
                    work.future.cancel()  # dropped if still waiting; a running batch finishes without it
                    raise Cancelled("D-RISE was cancelled") from None

    def _next(self) -> list[Work]:
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            first = self._waiting[0]
            group = [w for w in self._waiting if w.joins(first)][:self.max_images]
            for work in group:
                self._waiting.remove(work)
        return [w for w in group if w.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while True:
            group = self._next()
            if not group:
                continue
            self.batches = [*self.batches[-31:], len(group)]
            first = group[0]

            def progress(done: int, total: int, group: list[Work] = group) -> None:
                for work in group:  # the forwards are shared: each image's share of them
                    if work.progress is not None:
                        work.progress(done // len(group), total // len(group))

            def every_caller_gone(group: list[Work] = group) -> bool:
                return all(w.cancelled() for w in group)

            try:
                results = drise_batch(first.detector.detect, torch.stack([w.image for w in group]),
                                      [w.targets for w in group], first.detector.num_classes, first.settings,
                                      chunk=self.chunk or first.detector.pass_batch,
                                      early_stop=first.early_stop, on_progress=progress,
                                      should_stop=every_caller_gone)
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                for work in group:
                    work.future.set_exception(exc)
                continue
            for work, result in zip(group, results, strict=True):
                work.future.set_result(result)
