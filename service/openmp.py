"""How long the worker's idle OpenMP threads spin before they sleep (libgomp's GOMP_SPINCOUNT).

After each parallel op, libgomp keeps its team threads spinning for up to 300,000 iterations (its default)
in case another op follows. Within a pass one always does; after the last op of a pass the spinning goes on
for about 2 ms and holds a core that the request threads need to wake, encode and answer. On 2 cores that
delayed every response by ~2 ms (docs/benchmarks.md). 10,000 spins still bridge the gaps between ops inside
a pass (the pass time did not change) and end soon after it.

libgomp reads the variable once, when it is loaded, so this must run before torch is imported; an explicit
GOMP_SPINCOUNT in the environment wins.
"""
from __future__ import annotations

import os
import sys


def limit_openmp_spin(spin_count: int | None, environ: dict[str, str] | None = None) -> bool:
    """Set GOMP_SPINCOUNT unless it is set already or `spin_count` is None; True when this call set it."""
    environ = os.environ if environ is None else environ
    if spin_count is None or "GOMP_SPINCOUNT" in environ:
        return False
    if "torch" in sys.modules and environ is os.environ:
        return False  # too late: libgomp has read its settings
    environ["GOMP_SPINCOUNT"] = str(spin_count)
    return True
