"""Warm a pass thread before it takes requests.

PyTorch keeps cuDNN's execution plans per thread (a `thread_local` cache in aten's cudnn Conv_v8.cpp, since
plans are not guaranteed thread-safe) and builds them the first time a thread runs a shape. That takes seconds
per new batch size even with autotuning off, and a warm-up in the model-loading thread does not help the
worker threads (docs/benchmarks.md, "GPU: NVIDIA H100, second run"). So the thread that will run the
passes runs one pass at each padded size (service/engine.py `pass_sizes`) that a queue batch can reach.

On a CPU whose server keeps freed memory (service/host.py) the interactive lane's thread runs two passes at
its largest size: until the heap has grown to a pass's peak, every new peak is page-faulted and zeroed, which
a cold server's first clients pay for (docs/benchmarks.md, "Page faults"). The bulk lane's thread does not
warm on a CPU (service/host.py).
"""
from __future__ import annotations

import logging
import time

import torch

from .engine import explain, pass_sizes
from .methods.base import padded_size
from .methods.gradient import Gradient
from .settings import Settings
from .zoo import LoadedModel

log = logging.getLogger(__name__)


def warm_sizes(model: LoadedModel, pass_batch: int, settings: Settings) -> list[int]:
    """The padded pass sizes a batch of the queue can reach (it holds at most `max_batch_items` images)."""
    sizes = pass_sizes(model.device, pass_batch)
    # a batch beyond the pass budget splits into passes within it, so these cover it too
    return sorted({padded_size(n, sizes) for n in range(1, min(settings.max_batch_items, pass_batch) + 1)})


def warm_up(models: dict[str, LoadedModel], pass_batch: dict[str, int], settings: Settings) -> int:
    """Run each model's gradient pass (a forward and a backward to the input: every convolution's forward and
    input-gradient plans, the ones Grad-CAM, FullGrad and Gradient use) in the calling thread: on a GPU at its
    warm sizes (with `gpu_warmup`), on a CPU twice at its pass batch (with `retain_host_memory`). Returns the
    passes run."""
    method = Gradient()
    runs = 0
    for name, model in models.items():
        on_gpu = model.device.type == "cuda"
        if not (settings.gpu_warmup if on_gpu else settings.retain_host_memory):
            continue
        started, before = time.perf_counter(), runs
        height, width = model.preprocess.size
        # On a CPU twice: a fresh thread's second pass still faults some of its peak in, the first all of it.
        sizes = warm_sizes(model, pass_batch[name], settings) if on_gpu else [pass_batch[name]] * 2
        for size in sizes:
            x = torch.zeros(size, 3, height, width)
            explain(model, method, x, [None] * size, method.Params(), max_batch=pass_batch[name])
            runs += 1
        if on_gpu:
            torch.cuda.synchronize(model.device)
        log.info("warmed %s in this thread: %d passes of %s images in %.1f s", name, runs - before,
                 sorted(set(sizes)), time.perf_counter() - started)
    return runs
