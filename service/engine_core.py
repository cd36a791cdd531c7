"""One engine core for every backend: `boot` a device's models once per process, `warm_up` each thread that
will run passes, `run_batch` for each batch. Used by the embedded backend's lanes
(service/backends/embedded.py), by an engine process (service/engine_process.py) and by a Ray explainer
replica (service/distributed/explainer.py).

What `run_batch` raises is already classified (service/errors.py): EngineOutOfMemory (a MemoryError, so the
worker pool halves the batch), Cancelled, InvalidInput, or Internal.
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from .calibrate import calibrate_lane, hold_process_to_lane_share
from .engine import ImageExplanation, explain
from .errors import EngineOutOfMemory, as_service_error
from .evidence.spec import MetricsParams
from .host import tune_host
from .methods import MethodParams, Progress, get_method
from .settings import Settings
from .warmup import warm_up
from .zoo import ModelRegistry, resolve_device, set_cudnn_autotuning

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Items run together: images that share model, method and params (the queue's batch key says so)."""

    model: str
    method: str
    params: MethodParams
    pixels: torch.Tensor | np.ndarray  # (B, 3, H, W) float32, preprocessed
    targets: list[int | None]
    raw: list[bool]  # per image: keep the signed attribution
    sizes: list[tuple[int, int] | None]  # per image: also resize its map to this (height, width)
    metrics: MetricsParams | None = None  # the per-map metrics, for every image (part of the batch key)


def boot_host(settings: Settings, device: torch.device) -> None:
    """Process-wide settings for passes on `device`; before the process starts its threads (service/host.py).
    Idempotent."""
    tune_host(device, settings.retain_host_memory)
    set_cudnn_autotuning(settings.cudnn_benchmark)


class EngineCore:
    """A device's models and their pass budget, in the process that runs the passes."""

    def __init__(self, settings: Settings, registry: ModelRegistry, pass_batch: dict[str, int],
                 device: torch.device):
        self.settings, self.registry, self.pass_batch, self.device = settings, registry, pass_batch, device

    @classmethod
    def boot(cls, settings: Settings, *, registry: ModelRegistry | None = None,
             only: Collection[str] | None = None, own_process: bool = False) -> EngineCore:
        """Host settings, the models on the device (or `registry`, loaded already), and each model's images
        per pass (calibrate.py). `own_process`: this process runs one lane's passes only and is held to its
        lane's share of the device's memory (worker=process)."""
        device = resolve_device(settings.device)
        boot_host(settings, device)
        if registry is None:
            if only is None and settings.models:
                only = settings.models
            registry = ModelRegistry.from_dir(settings.card_dirs, device, set(only) if only else None,
                                              settings.fold_batchnorm)
        if own_process:
            hold_process_to_lane_share(device, settings)  # before the probes, so they run under the cap
        return cls(settings, registry, calibrate_lane(registry.models, settings), device)

    def warm_up(self) -> int:
        """Warm the calling thread, the one that will run the passes (service/warmup.py)."""
        return warm_up(self.registry.models, self.pass_batch, self.settings)

    def run_batch(self, batch: Batch, progress: Progress | None = None) -> list[ImageExplanation]:
        """One explanation per image of `batch`; `progress(done, total)` may raise Cancelled to stop it."""
        try:
            model = self.registry.get(batch.model)
            x = torch.as_tensor(batch.pixels)
            if model.device.type == "cuda":
                x = x.pin_memory()  # page-locked, so the copy to the device does not block this thread
            return explain(model, get_method(batch.method), x, batch.targets, batch.params, progress=progress,
                           top_k=self.settings.top_k, keep_attribution=batch.raw, map_sizes=batch.sizes,
                           metrics=batch.metrics,
                           max_batch=self.pass_batch.get(model.name, self.settings.max_pass_batch))
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()  # the pool splits the batch and retries
            raise EngineOutOfMemory(str(exc)) from None
        except Exception as exc:
            raise as_service_error(exc) from exc
