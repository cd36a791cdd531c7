"""Probe (not a test): what the first pass at a new batch size costs, and whether that cost is per thread.

    .venv/bin/python bench/firstpass.py [--device cuda] [--sizes 1,2,3,5,8,13] [--method gradcam]

For each size, a fresh thread A runs the method's pass twice (first, then again), then another fresh thread
B runs it once. If B's first pass costs what A's did, the first-time work is kept per thread (PyTorch's cuDNN
execution plans live in a thread-local cache); if B's is as cheap as A's second, it is kept per process.
Then `--padded` runs the same sizes through the service's padding (service/engine.py pass_sizes) in a thread
warmed by service/warmup.py, which is what a lane's worker thread does before it serves. On a CPU every
column is about the same; the question is for a GPU.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.engine import explain  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.warmup import warm_up  # noqa: E402
from service.zoo import ModelRegistry, resolve_device  # noqa: E402


def in_thread(fn):
    """Run fn in a new thread and return its result (each call: a thread with nothing cached yet)."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    thread.join()
    return out["value"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="1,2,3,5,8,13")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--max-batch", type=int, default=256, help="the pass budget (padding goes up to it)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = ModelRegistry.from_dir(ROOT / "models", device,
                                   only={"efficientnet_lite0"}).models["efficientnet_lite0"]
    method = METHODS[args.method]
    height, width = model.preprocess.size

    def timed(size: int, padded: bool) -> float:
        x = torch.rand(size, 3, height, width)
        if not padded:  # explain pads on a GPU; the plain rows call the method at exactly this size
            explainee = model.explainee(args.max_batch)
            x = x.to(device)

            def run():
                return method.attribute(explainee, x, torch.full((size,), -1, device=device), method.Params())
        else:
            def run():
                return explain(model, method, x, [None] * size, method.Params(), max_batch=args.max_batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000

    timed(1, False)  # the process's one-time start (CUDA context, lazy module loading of common kernels)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.method} on EfficientNet-Lite0, {name}, torch {torch.__version__}\n")
    print("| batch | thread A first ms | thread A second ms | thread B first ms | warmed thread, padded ms |")
    print("|---:|---:|---:|---:|---:|")
    sizes = [int(s) for s in args.sizes.split(",")]
    settings = Settings(max_batch_items=max(sizes))

    def warmed_thread():
        warm_up({model.name: model}, {model.name: args.max_batch}, settings)
        return [timed(size, True) for size in sizes]

    rows = []
    for size in sizes:
        # in_thread joins its thread before returning; `size=size` binds the size anyway (ruff B023)
        a_first, a_second = in_thread(lambda size=size: (timed(size, False), timed(size, False)))
        rows.append((size, a_first, a_second, in_thread(lambda size=size: timed(size, False))))
    # last, so that no column before it has seen a padded size; its warm-up runs in the thread that times it
    for (size, a_first, a_second, b_first), padded_ms in zip(rows, in_thread(warmed_thread), strict=False):
        print(f"| {size} | {a_first:.1f} | {a_second:.1f} | {b_first:.1f} | {padded_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
