"""Probe (not a test): how much a model pass slows down when other threads of the process run Python.

    .venv/bin/python bench/gil.py [--device cuda] [--duty 0.5] [--intervals 5,1,0.5,0.2]

Every torch op releases the GIL while it runs and takes it back when it returns. When another thread is
running Python at that moment, the pass waits until that thread lets go: at the latest when the switch
interval (`sys.setswitchinterval`, 5 ms by default) forces a hand-over. A pass of a few hundred ops waits that
many times. On a CPU the ops are long and the waits are a small share. On a GPU each op is a kernel launch of
microseconds, so the waits can be nearly all of the pass.

In the server the other threads are the event loop (HTTP, multipart, JSON) and the request and encoder
threads; under load they run Python much of the time. This probe times one Grad-CAM pass of the default model
alone, then beside `--threads` threads that each run pure Python for `--duty` of the time (in slices of 2 ms),
at each switch interval. It prints a median over `--repeats` passes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.engine import explain  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.zoo import ModelRegistry, resolve_device  # noqa: E402


def python_load(stop: threading.Event, duty: float, slice_s: float = 0.002) -> None:
    """Pure-Python work (holding the GIL) for `duty` of the time, sleeping (not holding it) for the rest."""
    while not stop.is_set():
        end = time.perf_counter() + slice_s
        while time.perf_counter() < end:
            sum(range(200))
        if duty < 1:
            time.sleep(slice_s * (1 - duty) / duty)


def timed_pass(model, x, params, device, repeats: int) -> float:
    def once() -> float:
        start = time.perf_counter()
        # the maps come back to the CPU: synced
        explain(model, METHODS["gradcam"], x, [None] * x.shape[0], params)
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="threads running Python beside the pass")
    parser.add_argument("--duty", type=float, default=0.5, help="share of the time each of them runs Python")
    parser.add_argument("--intervals", default="5,1,0.5,0.2", help="switch intervals to try, ms")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads (1: the other threads get a core of their own on a small CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    device = resolve_device(args.device)
    model = ModelRegistry.from_dir(ROOT / "models", device,
                                   only={"efficientnet_lite0"}).models["efficientnet_lite0"]
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    params = METHODS["gradcam"].Params()
    default_interval = sys.getswitchinterval()
    alone = timed_pass(model, x, params, device, args.repeats)
    print(f"device {device}, Grad-CAM on efficientnet_lite0, batch {args.batch}; "
          f"{args.threads} thread(s) running Python {args.duty:.0%} of the time\n")
    print(f"alone: {alone:.1f} ms per pass\n")
    print("| switch interval ms | ms per pass | x alone |\n|---:|---:|---:|")
    for interval in [float(v) for v in args.intervals.split(",")]:
        sys.setswitchinterval(interval / 1000)
        stop = threading.Event()
        load = [threading.Thread(target=python_load, args=(stop, args.duty), daemon=True)
                for _ in range(args.threads)]
        for thread in load:
            thread.start()
        try:
            ms = timed_pass(model, x, params, device, args.repeats)
        finally:
            stop.set()
            for thread in load:
                thread.join()
            sys.setswitchinterval(default_interval)
        print(f"| {interval:g} | {ms:.1f} | {ms / alone:.1f} |")


if __name__ == "__main__":
    main()
