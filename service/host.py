"""Host tuning for the passes on a CPU, in one place: applied by `tune_host` only where the passes run on a
CPU (the embedded backend's process, an engine process, a Ray explainer replica), never on a GPU server.

1. Keep freed host memory for the next pass instead of handing it back to the kernel.

glibc serves blocks above its mmap threshold (an activation of a few MB) with a fresh mmap and returns
them to the kernel on free, so every pass page-faults and zeroes its activations again, a large share of a CPU
pass's time (docs/benchmarks.md, "Page faults"). Fixed
thresholds make glibc reuse those blocks, as PyTorch's caching allocator does on a GPU; the process keeps
its peak heap in exchange. torch's CPU allocator has no such cache and no knob for it, so this is the
place; `SALIENCY_RETAIN_HOST_MEMORY=false` turns it off.

Two limits remain, each handled where it arises:
- Blocks above the threshold (at most 32 MiB) are still mapped afresh: the CPU pass batch keeps a pass's
  largest activation below it (service/calibrate.py).
- glibc gives each thread its own arena, a chain of 64 MiB heaps; a heap whose blocks are all freed is
  unmapped whatever the trim threshold, so a pass thread's arena faulted its largest activations in afresh on
  every pass. One arena for the process (the main heap, which only the trim threshold shrinks)
  keeps them: it must be set before the other threads first allocate.

2. Keep one long-lived OpenMP team per process: the interactive lane's.

libgomp gives every thread that runs a parallel region (any large torch op on the CPU) a pool of helper
threads, kept until that thread exits. Once it manages more threads than the process has CPUs, it stops
spinning between parallel regions, so every op of every pass waits for its helpers to be woken: a bulk-lane
thread that had run a single pass slowed every later interactive pass for the rest of the server's life
(docs/benchmarks.md, "OpenMP teams"). So the request threads preprocess in numpy
(service/zoo/preprocess.py), and CPU passes outside the interactive lane's thread run in a thread that ends
with them, taking its team along.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# glibc refuses an mmap threshold above half its arena heap size (32 MiB on 64-bit): use the most it takes.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds and keep one arena for this process; False where the C library
    is not glibc. Call it before starting threads: a thread that has allocated keeps the arena it got."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = all([mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                mallopt(_M_ARENA_MAX, 1)])
    if not done:
        log.warning("mallopt refused the thresholds: freed host memory goes back to the kernel")
    return done


def tune_host(device, retain_host_memory: bool) -> bool:
    """Apply the host tuning for passes on `device`: on a CPU, with `retain_host_memory`, keep freed memory
    (call it before starting threads). Returns whether anything was applied."""
    if device.type != "cpu" or not retain_host_memory:
        return False
    return retain_freed_memory()


def passes_in_passing_threads(lane: str, device) -> bool:
    """True for the lane whose passes run in passing threads, and which therefore does not warm up: the bulk
    lane on a CPU (on a GPU every lane keeps its thread, which holds its cuDNN plans: service/warmup.py)."""
    return lane == "bulk" and device.type == "cpu"


def run_in_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a new thread that ends when it returns; its result, or its exception
    re-raised. (A thread pool would keep the thread, and with it the team.)"""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"{threading.current_thread().name}-pass", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
