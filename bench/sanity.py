#!/usr/bin/env python
"""The per-model sanity report (service/evidence/sanity.py) of every registered method, printed as tables.

Cascading model-parameter randomisation (Adebayo et al. 2018) and the random-logit check on the four shipped
photos (service/evidence/photos). It prints, as markdown, the mean Spearman rank correlation between each
method's map on the model and on the model with its layers randomised from the logits down (one row per
level, cumulative), the same for the map of a random other class, and each method's verdict and reason.

    .venv/bin/python bench/sanity.py                           # efficientnet_lite0, cheap parameters, CPU
    .venv/bin/python bench/sanity.py --model tiny_cnn
    .venv/bin/python bench/sanity.py --full --device cuda      # every method at its default parameters
    .venv/bin/python bench/sanity.py --json report.json        # the report itself, too

Cheap parameters (the default, for a CPU): Integrated Gradients n_steps=16, SmoothGrad n_samples=8,
MoreauGrad iterations=10 x n_samples=4; every other parameter at its default. The table's header says which
ran. docs/sanity.md holds a run and how to read it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.evidence.sanity import (  # noqa: E402
    CLASS_LIMIT,
    RANDOMISED_LIMIT,
    profile_params,
    sanity_report,
    shipped_photos,
)
from service.methods import METHODS, MethodParams  # noqa: E402
from service.zoo import ModelRegistry, resolve_device  # noqa: E402


def describe(params: MethodParams) -> str:
    changed = params.model_dump(exclude_unset=True)
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"


def table(report: dict, key: str) -> list[str]:
    methods = [name for name, r in report["methods"].items()
               if r["levels"] and r["levels"][0][key] is not None]
    if not methods:
        return []
    first = next(iter(report["methods"].values()))
    lines = ["| randomised (cumulative) | " + " | ".join(methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for i, level in enumerate(first["levels"]):
        label = ("+ " if i else "") + ", ".join(level["layers"])
        cells = [f"{report['methods'][m]['levels'][i][key]:.2f}" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if key == "spearman":
        n = report["images"]
        cells = [f"{report['methods'][m]['levels'][-1]['constant_maps']} of {n}" for m in methods]
        lines.append("| constant maps, fully randomised (each counts 0) | " + " | ".join(cells) + " |")
        cells = [f"{report['methods'][m]['random_target']['spearman']:.2f}" for m in methods]
        lines.append("| **random other class** (not randomised) | " + " | ".join(cells) + " |")
        cross = [report["methods"][m]["cross_image"]["spearman"] for m in methods]
        cells = ["-" if c is None else f"{c:.2f}" for c in cross]
        lines.append("| different images (not randomised) | " + " | ".join(cells) + " |")
        cells = [f"**{report['methods'][m]['verdict']}**" for m in methods]
        lines.append("| **verdict** | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0", help="a card's name in models/")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--full", action="store_true", help="every method at its default parameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    registry = ModelRegistry.from_dir(ROOT / "models", device, only={args.model})
    model = registry.get(args.model)
    photos = shipped_photos()
    x = torch.stack([model.preprocess(p) for p in photos])
    methods = list(METHODS.values())
    params = {m.name: profile_params(m, "full" if args.full else "quick") for m in methods}

    started = time.perf_counter()

    last = [-1]

    def progress(done: int, total: int) -> None:
        if last[0] != done:  # a method's own calls repeat the count
            last[0] = done
            print(f"  {done}/{total} runs, {time.perf_counter() - started:.0f} s", file=sys.stderr,
                  flush=True)

    report = sanity_report(model, methods, x, params=params, progress=progress, seed=args.seed)
    elapsed = time.perf_counter() - started

    print(f"## Sanity report: {model.name}, {len(photos)} shipped photos, seed {args.seed}")
    print()
    print(f"`python bench/sanity.py --model {args.model}{' --full' if args.full else ''}` on {device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}), {datetime.date.today()}, {elapsed:.0f} s.")
    print("Parameters: " + "; ".join(f"{name}: {describe(p)}" for name, p in params.items()) + ".")
    print(f"Fail: Spearman >= {RANDOMISED_LIMIT} once every layer is randomised, or >= {CLASS_LIMIT} with a "
          "random other class's map.")
    print()
    print("Spearman rank correlation with the original map (heatmaps, mean over images):")
    print()
    print("\n".join(table(report, "spearman")))
    abs_lines = table(report, "spearman_abs")
    if abs_lines:
        print()
        print("The same on the per-pixel sum of |attribution| (methods with signed per-pixel attributions):")
        print()
        print("\n".join(abs_lines))
    print()
    for name, r in report["methods"].items():
        print(f"- {name}: **{r['verdict']}**, {r['reason']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
