"""Keep freed host memory for the next pass instead of handing it back to the kernel.

glibc serves blocks above its mmap threshold (an activation of a few MB) with a fresh mmap and returns
them to the kernel on free, so every pass page-faults and zeroes its activations again: about 4,000 faults
and 11 ms of system time per Grad-CAM pass of EfficientNet-Lite0 on the CPU (docs/benchmarks.md). Fixed
thresholds make glibc reuse those blocks, as PyTorch's caching allocator does on a GPU; the process keeps
its peak heap in exchange. torch's CPU allocator has no such cache and no knob for it, so this is the
place; `SALIENCY_RETAIN_HOST_MEMORY=false` turns it off.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above half its arena heap size (32 MiB on 64-bit): use the most it takes.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.warning("mallopt refused the thresholds: freed host memory goes back to the kernel")
    return done
