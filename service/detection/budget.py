"""A detector's pass budget: how many images one of its forwards may carry (D-RISE's masked copies).

The same rules as a classifier's pass batch (service/calibrate.py), so that D-RISE's memory follows the
server's settings and the device, never N:
- on a GPU, measured at start-up: the peak memory of the detector's forward (D-RISE runs no backward) at two
  batch sizes of a probe at its largest working image (`max_side` square), and the largest batch whose peak
  fits one lane's share of the free memory (`gpu_memory_fraction` / 2), within `max_pass_batch`;
- on a CPU, the `cpu_pass_batch` setting within `max_pass_batch`: a larger batch buys a detector on a CPU
  little or nothing a forward while its memory grows with it (docs/benchmarks.md, "D-RISE against
  vision-explanation-methods").

The probe is seeded uniform noise: a cascade such as MTCNN keeps more candidates on noise than on a plain
image, and its later stages' memory grows with them, so noise sizes the budget from a busy image, not an
empty one.
"""
from __future__ import annotations

import logging

import torch

from ..calibrate import PROBE_SIZES, lane_share, pass_batch_from_peaks, peak_bytes
from ..settings import Settings
from .base import LoadedDetector

log = logging.getLogger(__name__)


def probe(batch: int, side: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, side, side, generator=generator).to(device)


def measure_detector_peaks(detector: LoadedDetector, sizes: tuple[int, ...] = PROBE_SIZES) -> dict[int, int]:
    """Peak device bytes of one forward at each batch size, the input included (CUDA only)."""

    def run(b: int) -> None:
        with torch.no_grad():
            detector.detect(probe(b, detector.max_side, detector.device))

    return peak_bytes(detector.device, run, sizes)


def detector_pass_batch(detector: LoadedDetector, settings: Settings) -> int:
    """The most images per forward for `detector` under `settings` (see the module's docstring)."""
    cap = settings.max_pass_batch
    if detector.device.type != "cuda":
        return min(cap, settings.cpu_pass_batch)
    free, _ = torch.cuda.mem_get_info(detector.device)
    return pass_batch_from_peaks(measure_detector_peaks(detector), free, lane_share(settings), cap)


def calibrate_detectors(detectors: dict[str, LoadedDetector], settings: Settings) -> None:
    """Set each detector's `pass_batch` (at start-up, before the server is ready: on a GPU the peaks must
    not see other work's memory)."""
    for name, detector in detectors.items():
        detector.pass_batch = detector_pass_batch(detector, settings)
        log.info("%s: %d images per detector forward (%s)", name, detector.pass_batch, detector.device)
