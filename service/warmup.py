"""Warm a GPU pass thread before it takes requests.

PyTorch keeps cuDNN's execution plans per thread (a `thread_local` cache in aten's cudnn Conv_v8.cpp, since
plans are not guaranteed thread-safe) and builds them the first time a thread runs a shape. On an H100 that
took seconds per new batch size with autotuning off, and a warm-up in the model-loading thread did not help
the worker threads (docs/benchmarks.md, "GPU: NVIDIA H100, second run"). So the thread that will run the
passes runs one pass at each padded size (service/engine.py `pass_sizes`) that a queue batch can reach.
"""
from __future__ import annotations

import logging
import time

import torch

from .engine import explain, pass_sizes
from .methods import METHODS
from .methods.base import padded_size
from .settings import Settings
from .zoo import LoadedModel

log = logging.getLogger(__name__)


def warm_sizes(model: LoadedModel, pass_batch: int, settings: Settings) -> list[int]:
    """The padded pass sizes a batch of the queue can reach (it holds at most `max_batch_items` images)."""
    sizes = pass_sizes(model.device, pass_batch)
    # a batch beyond the pass budget splits into passes within it, so these cover it too
    return sorted({padded_size(n, sizes) for n in range(1, min(settings.max_batch_items, pass_batch) + 1)})


def warm_up(models: dict[str, LoadedModel], pass_batch: dict[str, int], settings: Settings) -> int:
    """Run each GPU model's gradient pass (a forward and a backward to the input: every convolution's forward
    and input-gradient plans, the ones Grad-CAM, FullGrad and Gradient use) at its warm sizes, in the calling
    thread. Returns the passes run: 0 on a CPU or with `gpu_warmup` off."""
    if not settings.gpu_warmup:
        return 0
    method = METHODS["gradient"]
    runs = 0
    for name, model in models.items():
        if model.device.type != "cuda":
            continue
        started = time.perf_counter()
        height, width = model.preprocess.size
        for size in warm_sizes(model, pass_batch[name], settings):
            x = torch.zeros(size, 3, height, width)
            explain(model, method, x, [None] * size, method.Params(), max_batch=pass_batch[name])
            runs += 1
        torch.cuda.synchronize(model.device)
        log.info("warmed %s in this thread: %d pass sizes in %.1f s", name, runs, time.perf_counter() - started)
    return runs
