"""The engine's methods with the model in NHWC (channels_last, as the zoo loads it) against the same model in
NCHW (contiguous), same process, alternating, on chelsea.

    .venv/bin/python bench/memory_format.py [--device cpu] [--model efficientnet_lite0]

Prints ms per image for each layout, their ratio, and the largest difference between the two maps (the
layouts sum in different orders, so maps agree to float rounding, not bitwise).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.engine import explain  # noqa: E402
from service.hostmem import retain_freed_memory  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.zoo import ModelRegistry  # noqa: E402

CASES = [("gradcam", {}, 1, 10), ("gradcam", {}, 8, 3), ("gradient", {}, 1, 10),
         ("integrated-gradients", {"n_steps": 16}, 1, 2), ("smoothgrad", {"n_samples": 8}, 1, 2),
         ("fullgrad", {}, 1, 4)]


def per_image_ms(model, method: str, x: torch.Tensor, params, repeats: int) -> tuple[float, torch.Tensor]:
    targets = [None] * x.shape[0]
    explain(model, METHODS[method], x, targets, params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = explain(model, METHODS[method], x, targets, params)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / x.shape[0], results[0].heatmap


def main() -> None:
    from PIL import Image
    from skimage import data

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()
    retain_freed_memory()  # as the server does
    registry = ModelRegistry.from_dir(ROOT / "models", torch.device(args.device), only={args.model})
    nhwc = registry.models[args.model]
    nchw = dataclasses.replace(nhwc, module=copy.deepcopy(nhwc.module).to(memory_format=torch.contiguous_format))
    x = nhwc.preprocess(Image.fromarray(data.chelsea())).unsqueeze(0).to(args.device)
    print(f"{args.model} on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "two alternating rounds per layout, medians\n")
    print("| method | batch | NCHW ms/img | NHWC ms/img | NHWC / NCHW | max map difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, raw_params, batch, repeats in CASES:
        params = METHODS[method].Params(**raw_params)
        xb = x.repeat(batch, 1, 1, 1)
        times: dict[str, list[float]] = {"nchw": [], "nhwc": []}
        maps = {}
        for _ in range(2):
            for name, model in (("nchw", nchw), ("nhwc", nhwc)):
                ms, maps[name] = per_image_ms(model, method, xb, params, repeats)
                times[name].append(ms)
        a, b = statistics.median(times["nchw"]), statistics.median(times["nhwc"])
        diff = (maps["nchw"] - maps["nhwc"]).abs().max().item()
        label = method + (f" ({', '.join(f'{k}={v}' for k, v in raw_params.items())})" if raw_params else "")
        print(f"| {label} | {batch} | {a:.1f} | {b:.1f} | {b / a:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
