"""Keep one long-lived OpenMP team per process on the CPU: the interactive lane's.

libgomp gives every thread that runs a parallel region (any large torch op on the CPU) a pool of helper
threads, kept until that thread exits. Once it manages more threads than the process has CPUs, it stops
spinning between parallel regions, so every op of every pass waits for its helpers to be woken. On 2 cores, a
bulk-lane thread that had run a single pass made every later interactive Grad-CAM pass 1.4-1.5x slower for the
rest of the server's life (docs/benchmarks.md, "OpenMP teams"). So the request threads preprocess in numpy
(service/zoo/preprocess.py), and CPU passes outside the interactive lane's thread run in a thread that ends
with them, taking its team along.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def passes_in_passing_threads(lane: str, device) -> bool:
    """True for the lane whose passes run in passing threads, and which therefore does not warm up: the bulk
    lane on a CPU (on a GPU every lane keeps its thread, which holds its cuDNN plans: service/warmup.py)."""
    return lane == "bulk" and device.type == "cpu"


def run_in_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a new thread that ends when it returns; its result, or its exception re-raised.
    (A thread pool would keep the thread, and with it the team.)"""
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
