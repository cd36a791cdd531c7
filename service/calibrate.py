"""Size forward passes from measured device memory instead of a guess.

At start-up on a GPU, each model runs forward+backward at two batch sizes; the peak memory gives a fixed
cost and a per-image cost, and the largest batch that fits in a fraction of the free memory becomes the
model's pass batch (capped by the `max_pass_batch` setting).

On the CPU the `cpu_pass_batch` setting is the cap, lowered when the server retains freed memory
(service/host.py) so that one pass's largest activation stays below glibc's mmap threshold. glibc maps
any larger block afresh, so a pass whose activations cross it page-faults and zeroes them again every time,
while the passes below it take next to no faults (docs/benchmarks.md, "Page faults").

Two lanes (interactive and bulk) may each run a pass at the same moment on one device, so each gets half of
the `gpu_memory_fraction` setting. An engine process (worker=process) is also held to its half by PyTorch's
per-process cap: caching allocators do not share between processes, and without the cap one lane's cache,
grown by a large pass and never returned, could leave the other lane's process nothing.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .host import MMAP_THRESHOLD
from .methods.passes import input_gradients
from .settings import Settings
from .zoo import LoadedModel

log = logging.getLogger(__name__)
PROBE_SIZES = (1, 4)
LANES = 2  # interactive and bulk: passes that may run at the same moment on one device
_ALLOCATOR_SLACK = 4096  # bytes a tensor's block may take beyond its data (alignment, glibc's chunk header)


def pass_batch_from_peaks(peaks: dict[int, int], free_bytes: int, fraction: float, cap: int) -> int:
    """Largest batch b with fixed + b * per_image <= fraction * free, from peak bytes at two batch sizes."""
    (b0, p0), (b1, p1) = sorted(peaks.items())[:2]
    per_image = max((p1 - p0) / (b1 - b0), 1.0)
    fixed = max(p0 - b0 * per_image, 0.0)
    fits = int((fraction * free_bytes - fixed) // per_image)
    return max(1, min(cap, fits))


def peak_bytes(device: torch.device, run: Callable[[int], None], sizes=PROBE_SIZES) -> dict[int, int]:
    """Peak device bytes of `run(b)` at each batch size b, above what was allocated before it (its inputs
    included when it allocates them): CUDA only."""
    peaks = {}
    for b in sizes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(b)
        torch.cuda.synchronize(device)
        peaks[b] = torch.cuda.max_memory_allocated(device) - base
    return peaks


def measure_peaks(model: LoadedModel, sizes=PROBE_SIZES) -> dict[int, int]:
    """A classifier's forward+backward (the input gradient) at each size."""
    device = model.device
    height, width = model.preprocess.size

    def run(b: int) -> None:
        x = torch.zeros(b, 3, height, width, device=device)
        input_gradients(model.module, x, torch.zeros(b, dtype=torch.long, device=device))

    return peak_bytes(device, run, sizes)


def largest_activation_bytes(model: LoadedModel) -> int:
    """Bytes of the largest tensor that one image's forward pass produces: the input or any module's output
    (the backward's input-gradients have the same shapes)."""
    largest = 0

    def record(output) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())
        elif isinstance(output, (tuple, list)):
            for item in output:
                record(item)
        elif isinstance(output, dict):
            for item in output.values():
                record(item)

    height, width = model.preprocess.size
    x = torch.zeros(1, 3, height, width, device=model.device)
    record(x)
    handles = [m.register_forward_hook(lambda _m, _i, out: record(out)) for m in model.module.modules()]
    try:
        with torch.no_grad():
            model.module(x)
    finally:
        for handle in handles:
            handle.remove()
    return largest


def host_pass_batch(model: LoadedModel, block_limit: int) -> int:
    """Most images per pass whose largest activation stays below `block_limit` bytes (at least one): a
    tensor's block is a little larger than its data, and glibc maps a block of exactly its threshold."""
    return max(1, (block_limit - _ALLOCATOR_SLACK) // largest_activation_bytes(model))


def calibrate(models: dict[str, LoadedModel], cap: int, cpu_pass_batch: int | None = None,
              fraction: float = 0.5, host_block_limit: int | None = None) -> dict[str, int]:
    """Pass batch per model: from measured memory on a GPU; on a CPU `cpu_pass_batch` (within the cap),
    lowered so that each activation stays below `host_block_limit` bytes when one is given."""
    out = {}
    for name, model in models.items():
        if model.device.type != "cuda":
            out[name] = min(cap, cpu_pass_batch or cap)
            if host_block_limit is None:
                continue
            fits = host_pass_batch(model, host_block_limit)
            if fits < out[name]:
                out[name] = fits
                log.info("%s: %d images per pass on the CPU, the most whose largest activation stays below "
                         "glibc's mmap threshold (%d MiB)", name, out[name], host_block_limit // 2**20)
            continue
        free, _ = torch.cuda.mem_get_info(model.device)
        out[name] = pass_batch_from_peaks(measure_peaks(model), free, fraction, cap)
        log.info("calibrated %s: %d images per pass (%.1f GiB free)", name, out[name], free / 2**30)
    return out


def lane_share(settings: Settings) -> float:
    """The fraction of free device memory one lane's passes may use."""
    return settings.gpu_memory_fraction / LANES


def calibrate_lane(models: dict[str, LoadedModel], settings: Settings) -> dict[str, int]:
    """Pass batch per model for one lane under `settings`."""
    return calibrate(models, settings.max_pass_batch, settings.cpu_pass_batch, lane_share(settings),
                     MMAP_THRESHOLD if settings.retain_host_memory else None)


def process_memory_fraction(reserved: int, free: int, total: int, share: float) -> float:
    """The per-process cap, as a fraction of the device's total memory, that leaves this process what it holds
    already (its weights) plus `share` of the memory still free."""
    return min(1.0, (reserved + share * free) / total)


def hold_process_to_lane_share(device: torch.device, settings: Settings) -> float | None:
    """Cap this process's CUDA allocator at its lane's share (see the module's docstring); None on a CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    fraction = process_memory_fraction(torch.cuda.memory_reserved(device), free, total, lane_share(settings))
    # the allocator wants an indexed device; a bare 'cuda' means the current one
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    log.info("this engine process may hold %.1f of %.1f GiB", fraction * total / 2**30, total / 2**30)
    return fraction
