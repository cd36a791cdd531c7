"""Keep freed host memory for the next pass instead of handing it back to the kernel.

glibc serves blocks above its mmap threshold (an activation of a few MB) with a fresh mmap and returns
them to the kernel on free, so every pass page-faults and zeroes its activations again: about 4,000 faults
and 11 ms of system time per Grad-CAM pass of EfficientNet-Lite0 on the CPU (docs/benchmarks.md). Fixed
thresholds make glibc reuse those blocks, as PyTorch's caching allocator does on a GPU; the process keeps
its peak heap in exchange. torch's CPU allocator has no such cache and no knob for it, so this is the
place; `SALIENCY_RETAIN_HOST_MEMORY=false` turns it off.

Two limits remain, each handled where it arises:
- Blocks above the threshold (at most 32 MiB) are still mapped afresh: the CPU pass batch keeps a pass's
  largest activation below it (service/calibrate.py).
- glibc gives each thread its own arena, a chain of 64 MiB heaps; a heap whose blocks are all freed is
  unmapped whatever the trim threshold, so a pass thread's arena faulted two 29 MB activations in afresh on
  every pass of 6 images. One arena for the process (the main heap, which only the trim threshold shrinks)
  keeps them: it must be set before the other threads first allocate.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# glibc refuses an mmap threshold above half its arena heap size (32 MiB on 64-bit): use the most it takes.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds and keep one arena for this process; False where the C library is
    not glibc. Call it before starting threads: a thread that has allocated keeps the arena it got."""
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
