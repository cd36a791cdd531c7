"""Two variants of one loaded model (a layout, a folding), timed through `engine.explain` in one process,
alternating, on chelsea: ms per image for each, their ratio, and the largest difference between their maps
(the variants sum in different orders, so maps agree to float rounding, not bitwise)."""
from __future__ import annotations

import statistics
import time

import torch

from service.engine import explain
from service.methods import METHODS

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


def compare(baseline: tuple[str, object], variant: tuple[str, object], x: torch.Tensor, cases=CASES) -> None:
    """Prints a Markdown table: per case, each side's median of two alternating rounds, variant / baseline."""
    (a_name, a_model), (b_name, b_model) = baseline, variant
    print(f"| method | batch | {a_name} ms/img | {b_name} ms/img | {b_name} / {a_name} "
          "| max map difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, raw_params, batch, repeats in cases:
        params = METHODS[method].Params(**raw_params)
        xb = x.repeat(batch, 1, 1, 1)
        times: dict[str, list[float]] = {a_name: [], b_name: []}
        maps = {}
        for _ in range(2):
            for name, model in ((a_name, a_model), (b_name, b_model)):
                ms, maps[name] = per_image_ms(model, method, xb, params, repeats)
                times[name].append(ms)
        a, b = statistics.median(times[a_name]), statistics.median(times[b_name])
        diff = (maps[a_name] - maps[b_name]).abs().max().item()
        label = method + (f" ({', '.join(f'{k}={v}' for k, v in raw_params.items())})" if raw_params else "")
        print(f"| {label} | {batch} | {a:.1f} | {b:.1f} | {b / a:.2f} | {diff:.1e} |", flush=True)
