"""Size forward passes from measured device memory instead of a guess.

At start-up on a GPU, each model runs forward+backward at two batch sizes; the peak memory gives a fixed
cost and a per-image cost, and the largest batch that fits in a fraction of the free memory becomes the
model's pass batch (capped by the `max_pass_batch` setting). On the CPU the setting is used as is.
"""
from __future__ import annotations

import logging

import torch

from .methods.gradients import input_gradients
from .zoo import LoadedModel

log = logging.getLogger(__name__)
PROBE_SIZES = (1, 4)


def pass_batch_from_peaks(peaks: dict[int, int], free_bytes: int, fraction: float, cap: int) -> int:
    """Largest batch b with fixed + b * per_image <= fraction * free, from peak bytes at two batch sizes."""
    (b0, p0), (b1, p1) = sorted(peaks.items())[:2]
    per_image = max((p1 - p0) / (b1 - b0), 1.0)
    fixed = max(p0 - b0 * per_image, 0.0)
    fits = int((fraction * free_bytes - fixed) // per_image)
    return max(1, min(cap, fits))


def measure_peaks(model: LoadedModel, sizes=PROBE_SIZES) -> dict[int, int]:
    device = model.device
    height, width = model.preprocess.size
    peaks = {}
    for b in sizes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        x = torch.zeros(b, 3, height, width, device=device)
        input_gradients(model.module, x, torch.zeros(b, dtype=torch.long, device=device))
        torch.cuda.synchronize(device)
        peaks[b] = torch.cuda.max_memory_allocated(device) - base
        del x
    return peaks


def calibrate(models: dict[str, LoadedModel], cap: int, cpu_pass_batch: int | None = None,
              fraction: float = 0.5) -> dict[str, int]:
    """Pass batch per model: from measured memory on a GPU; `cpu_pass_batch` (within the cap) on a CPU."""
    out = {}
    for name, model in models.items():
        if model.device.type != "cuda":
            out[name] = min(cap, cpu_pass_batch or cap)
            continue
        free, _ = torch.cuda.mem_get_info(model.device)
        out[name] = pass_batch_from_peaks(measure_peaks(model), free, fraction, cap)
        log.info("calibrated %s: %d images per pass (%.1f GiB free)", name, out[name], free / 2**30)
    return out
