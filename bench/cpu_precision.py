#!/usr/bin/env python
"""Why the service refuses a request's bf16/fp16 `precision` on a CPU (setting `cpu_reduced_precision`).

Times each method on EfficientNet-Lite0 and skimage's chelsea in process, under the engine's precision policy
(`service.engine.explain`), in fp32, bf16 and fp16: the first call of each (kernels picked and warmed) and the
median of the next `--repeat`. Prints each reduced precision's time as a multiple of fp32's.

    .venv/bin/python bench/cpu_precision.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine import explain  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.zoo import ModelRegistry  # noqa: E402

CASES = {"gradcam": {}, "fullgrad": {}, "integrated-gradients": {"n_steps": 8},
         "smoothgrad": {"n_samples": 4}}


def timed(model, name: str, x: torch.Tensor, precision: str) -> float:
    params = METHODS[name].Params(precision=precision, **CASES[name])
    started = time.perf_counter()
    explain(model, METHODS[name], x, [None], params)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ModelRegistry.from_dir(ROOT / "models", torch.device("cpu"), only={"efficientnet_lite0"}).get(
        "efficientnet_lite0")
    x = model.preprocess(Image.fromarray(data.chelsea())).unsqueeze(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call: first / median of "
          f"{args.repeat}; x = median against fp32's\n")
    print("| method | fp32 ms | bf16 ms | fp16 ms | bf16 x | fp16 x |\n|---|---:|---:|---:|---:|---:|")
    for name in CASES:
        cells, medians = [], {}
        for precision in ("fp32", "bf16", "fp16"):
            first = timed(model, name, x, precision)
            medians[precision] = statistics.median(timed(model, name, x, precision)
                                                   for _ in range(args.repeat))
            cells.append(f"{first:.0f} / {medians[precision]:.0f}")
        ratios = [f"{medians[p] / medians['fp32']:.1f}" for p in ("bf16", "fp16")]
        print(f"| {name} | " + " | ".join(cells + ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
