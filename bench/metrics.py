#!/usr/bin/env python
"""The per-map metrics (service/evidence/curves.py) on the real model: agreement with Quantus, and cost.

    .venv/bin/python bench/metrics.py                          # efficientnet_lite0, K=20, blur, CPU
    .venv/bin/python bench/metrics.py --threads 1              # on a shared machine (see 2. below)
    .venv/bin/python bench/metrics.py --steps 16 --replacement black --repeats 5
    .venv/bin/python bench/metrics.py --device cuda --full     # every method at its default parameters

Five methods (gradcam, integrated-gradients, smoothgrad, fullgrad, gradient) on the four shipped photos
(service/evidence/photos), each explained by `service.engine.explain(..., metrics=MetricsParams(...))`, the
path the server takes, with passes of the service's CPU pass batch (service/calibrate.py) and its host
tuning (service/host.py). Cheap parameters unless --full: Integrated Gradients n_steps=16, SmoothGrad
n_samples=8 (bench/sanity.py's).

1. Agreement. Each curve against Quantus 0.6.0's `PixelFlipping` playing the same game:
   - order: the map's order made tie-free in raster order (numpy's stable argsort of -map), handed to Quantus
     as a map of -rank. Quantus sorts with np.argsort's default (not stable) over the map broadcast to
     (C, H, W): on a map with ties (Grad-CAM's zeros) its order of the tied pixels is its own and a step can
     split a pixel's channels, so the raw map would not be the same game. The random order is ours
     (`random_order`, seed 0, as the server plays it), handed over the same way.
   - steps: `features_in_step` = C * (H*W // K), so each of Quantus's steps is one of ours (a pixel's C equal
     values are neighbours in its order). Where K does not divide H*W (224 * 224 = 50176 and K = 20), our last
     step takes the remainder and Quantus makes one more, shorter step: its curve has one point (H*W - the
     remainder pixels) that ours lacks, dropped before comparing. Quantus checks that `features_in_step`
     divides H*W, reading (H, W) though its steps count (C, H, W) features; no K passes that check with C = 3
     at 224 x 224, so the check is skipped (`Flipping.custom_preprocess`), nothing else.
   - substrate: a `perturb_func` that takes the replaced features from an array computed here independently
     of service/: blur by scipy (`ndimage.convolve` with RISE's gkern(11, 5) = `gaussian_filter` of a Dirac
     delta, mode "nearest" = replicated borders, float64), black = (0 - mean) / std from the card, mean = the
     image's per-channel mean. Quantus's own "black" is the image's minimum, not pixel value 0.
   - deletion: PixelFlipping from the image, replacing by the substrate. Quantus has no insertion metric
     (0.6.0: PixelFlipping, RegionPerturbation, ROAD, IROF, Selectivity, SensitivityN, ... all remove), so
     insertion is the same PixelFlipping game played from the substrate, replacing by the image: restoring
     the first k steps' pixels. Labelled "Quantus PF from the substrate".
   - end points: Quantus records after each step only; its deletion ends at the fully substituted image (our
     insertion's first point) and its insertion at the untouched image (our deletion's first point), so the
     K + 1 points of each curve come from Quantus's two runs. Quantus's AUC in the table is that curve's
     trapezoid over x in [0, 1] (np.trapezoid, dx = 1/K), ours' convention; Quantus's own
     `return_auc_per_sample` is np.trapz with dx = 1 over its K (or K + 1) points, another scale.
   Tolerance: max |difference| of any curve point (a softmax probability) <= TOLERANCE; the script also
   prints the float32 noise floor it measures (the same images in passes of other sizes).

2. Cost. Per method, the same explain call without and with metrics, interleaved (without, with, plain
   forwards) after a warm-up, medians over --repeats rounds; the ratio against the expected one,
   (t_method + B * F * t_fwd) / t_method, where F = `forwards_per_image(K)` and t_fwd is a plain forward
   pass (no_grad) per image at the pass size the curves use (`even_chunk(B * F, pass batch)`), timed over a
   quarter of the curves' passes each round. The issue's bound: measured <= 1.3 x expected. Each figure on
   two clocks, wall / this process's CPU time: on a machine other processes load, the wall clock measures
   the load as much as the code (a pass waits for a core; at 2 threads on 2 cores every OpenMP region waits
   for its slower thread), and so does the CPU time at more than one thread (OpenMP's helpers spin while
   they wait). At --threads 1 the CPU time is the work itself: use it on a shared machine.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.calibrate import calibrate_lane  # noqa: E402
from service.engine import explain  # noqa: E402
from service.evidence.curves import forwards_per_image, random_order  # noqa: E402
from service.evidence.sanity import PHOTOS, shipped_photos  # noqa: E402
from service.evidence.spec import MetricsParams  # noqa: E402
from service.host import tune_host  # noqa: E402
from service.methods import METHODS, MethodParams  # noqa: E402
from service.methods.passes import even_chunk  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.zoo import ModelRegistry, resolve_device  # noqa: E402

METHOD_NAMES = ("gradcam", "integrated-gradients", "smoothgrad", "fullgrad", "gradient")
CHEAP = {"n_steps": 16, "n_samples": 8}  # bench/sanity.py's, for the methods here
# A curve point is a softmax probability computed in float32 on both sides by different passes: ours in
# passes of the service's pass batch from copies built in torch, Quantus's in passes of the 4 images from
# numpy copies, with a float64 scipy substrate against torch's float32 one. oneDNN picks its kernels (and so
# the order of its float32 sums) by batch size, so the same image's probability moves in its last bits: the
# floor this script measures is 2-4e-7, and the substrate's rounding adds to it (the largest difference seen
# on the CPU, 2026-12-03: 1.6e-6). 1e-4 is 60x that, and 1e-4 of a probability moves no AUC printed to 4
# decimals by more than 1 in its last place.
TOLERANCE = 1e-4
BOUND = 1.3  # the issue's: measured cost ratio <= 1.3 x expected


def quantus_module():
    # Quantus 0.6.0 calls np.trapz, which numpy 2.4 removed; np.trapezoid is the same function renamed.
    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid  # type: ignore[attr-defined]
    import quantus

    return quantus


def method_params(name: str, full: bool) -> MethodParams:
    method = METHODS[name]
    if full:
        return method.Params()
    return method.Params(**{k: v for k, v in CHEAP.items() if k in method.Params.model_fields})


def describe(params: MethodParams) -> str:
    changed = params.model_dump(exclude_unset=True)
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"


# --- 1. agreement -------------------------------------------------------------------------------------------

def independent_substrate(x: np.ndarray, replacement: str, mean: tuple[float, ...],
                          std: tuple[float, ...]) -> np.ndarray:
    """(B, C, H, W) float64, what the pixels are replaced by, computed without service/."""
    from scipy import ndimage

    if replacement == "blur":
        delta = np.zeros((11, 11))
        delta[5, 5] = 1.0
        kernel = ndimage.gaussian_filter(delta, 5)  # RISE's evaluation.py gkern(11, 5)
        return np.stack([np.stack([ndimage.convolve(channel.astype(np.float64), kernel, mode="nearest")
                                   for channel in image]) for image in x])
    if replacement == "black":
        black = (0.0 - np.asarray(mean)) / np.asarray(std)
        return np.broadcast_to(black[None, :, None, None], x.shape).astype(np.float64)
    return np.broadcast_to(x.astype(np.float64).mean((2, 3), keepdims=True), x.shape).copy()


def tie_free_ranks(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) float32 -rank of each pixel in the map's order (ties in raster order): larger = earlier."""
    order = np.argsort(-heatmap.ravel(), kind="stable")
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return (-ranks).astype(np.float32).reshape(heatmap.shape)


def order_ranks(order: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return (-ranks).astype(np.float32).reshape(shape)


def flipping_class(quantus):
    pixel_flipping: Any = quantus.PixelFlipping

    class Flipping(pixel_flipping):
        """PixelFlipping less its features_in_step check, which reads (H, W) though a step counts (C, H, W)
        features (see the module docstring); the game is PixelFlipping's own `evaluate_batch`."""

        def custom_preprocess(self, x_batch, **kwargs):
            return None

    return Flipping


def replace_from(source: np.ndarray):
    """A Quantus perturb_func: the features at `indices` take `source`'s values (source: (B, C*H*W))."""

    def perturb(arr: np.ndarray, indices: np.ndarray, **kwargs: Any) -> np.ndarray:
        out = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        out[rows, indices] = source[rows, indices]
        return out

    return perturb


def quantus_flipping(quantus, module, start: np.ndarray, replacement: np.ndarray, ranks: np.ndarray,
                     targets: np.ndarray, steps: int, device: str) -> np.ndarray:
    """Quantus's PixelFlipping curves (B, J): from `start`, replacing the features by `replacement`'s in the
    order of `ranks` (B, H, W), C * (H*W // steps) features a step."""
    batch, channels, height, width = start.shape
    metric = flipping_class(quantus)(
        features_in_step=channels * (height * width // steps), perturb_func=replace_from(
            replacement.reshape(batch, -1).astype(np.float32)), normalise=False, abs=False,
        disable_warnings=True)
    curves = metric(model=module, x_batch=start.astype(np.float32), y_batch=targets, a_batch=ranks[:, None],
                    channel_first=True, softmax=True, device=device, batch_size=batch)
    return np.asarray(curves, dtype=np.float64)


def our_points(pixels: int, steps: int, quantus_points: int) -> list[int]:
    """The indices of Quantus's points (after step j + 1, j from 0) that are our points 1..K."""
    per_step = pixels // steps
    counts = [min((j + 1) * per_step, pixels) for j in range(quantus_points)]
    wanted = [k * per_step for k in range(1, steps)] + [pixels]
    return [counts.index(c) for c in wanted]


def quantus_curves(quantus, module, x: np.ndarray, base: np.ndarray, ranks: np.ndarray, targets: np.ndarray,
                   steps: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(deletion, insertion), each (B, K + 1), from Quantus's two runs."""
    pixels = x.shape[2] * x.shape[3]
    deleted = quantus_flipping(quantus, module, x, base, ranks, targets, steps, device)
    inserted = quantus_flipping(quantus, module, base, x, ranks, targets, steps, device)
    keep = our_points(pixels, steps, deleted.shape[1])
    untouched, substituted = inserted[:, keep[-1]], deleted[:, keep[-1]]
    deletion = np.concatenate([untouched[:, None], deleted[:, keep]], 1)
    insertion = np.concatenate([substituted[:, None], inserted[:, keep]], 1)
    return deletion, insertion


def auc(curve) -> float:
    return float(np.trapezoid(np.asarray(curve, dtype=np.float64), dx=1 / (len(curve) - 1)))


def noise_floor(module, x: torch.Tensor, base: torch.Tensor, targets: torch.Tensor, pass_batch: int) -> float:
    """Max |difference| of the target probabilities of the same 2B images (photos and substrates) forwarded
    one at a time, all in one pass, and in passes of `pass_batch`."""
    images = torch.cat([x, base.float()])
    wanted = torch.cat([targets, targets]).view(-1, 1)
    found = []
    with torch.no_grad():
        for size in (1, images.shape[0], pass_batch):
            logits = torch.cat([module(c) for c in images.split(size)])
            found.append(logits.float().softmax(1).gather(1, wanted).squeeze(1))
    return max(float((a - b).abs().max()) for a in found for b in found)


# --- 2. cost ------------------------------------------------------------------------------------------------

def timed(fn) -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds, all its threads) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def cost_row(name: str, without: list[tuple[float, float]], with_metrics: list[tuple[float, float]],
             fwd: list[tuple[float, float]], images: int) -> tuple[str, list[float]]:
    """A table row, wall / CPU in each cell, and measured / expected on each clock."""
    cells: list[list[str]] = [[] for _ in range(6)]
    ratios = []
    for clock in (0, 1):
        t_method, t_with, t_fwd = (statistics.median(v[clock] for v in runs)
                                   for runs in (without, with_metrics, fwd))
        measured = t_with / t_method
        expected = (t_method + images * t_fwd) / t_method
        ratios.append(measured / expected)
        for cell, value in zip(cells, (f"{t_method:.2f}", f"{t_with:.2f}", f"{1000 * t_fwd:.1f}",
                                       f"{measured:.1f}", f"{expected:.1f}", f"{measured / expected:.2f}"),
                               strict=True):
            cell.append(value)
    return f"| {name} | " + " | ".join(" / ".join(c) for c in cells) + " |", ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0", help="a card's name in models/")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--steps", type=int, default=MetricsParams().steps)
    parser.add_argument("--replacement", default=MetricsParams().replacement,
                        choices=("blur", "black", "mean"))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method (after a warm-up)")
    parser.add_argument("--full", action="store_true", help="every method at its default parameters")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    args = parser.parse_args()

    device = resolve_device(args.device)
    settings = Settings()
    tune_host(device, settings.retain_host_memory)  # as the server, before any thread allocates
    if args.threads:
        torch.set_num_threads(args.threads)
    quantus = quantus_module()
    registry = ModelRegistry.from_dir(ROOT / "models", device, only={args.model})
    model = registry.get(args.model)
    pass_batch = calibrate_lane({model.name: model}, settings)[model.name]
    photos = shipped_photos()
    names = [p.stem for p in sorted(PHOTOS.glob("*.jpg"))]
    x = torch.stack([model.preprocess(p) for p in photos]).to(device)
    batch, _, height, width = x.shape
    metrics = MetricsParams(steps=args.steps, replacement=args.replacement)
    forwards = forwards_per_image(metrics.steps)
    chunk = even_chunk(batch * forwards, pass_batch)
    methods = [m for m in args.methods.split(",") if m]
    params = {name: method_params(name, args.full) for name in methods}
    started = time.perf_counter()

    print(f"## Per-map metrics on {model.name}: agreement with Quantus and cost")
    print()
    processor = platform.processor() or platform.machine()
    print(f"`python bench/metrics.py --model {args.model} --steps {metrics.steps} --replacement "
          f"{metrics.replacement}{' --full' if args.full else ''}` on {device} ({processor}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, quantus {quantus.__version__}), "
          f"{datetime.date.today()}.")
    print(f"{batch} shipped photos ({', '.join(names)}), {height} x {width}; K = {metrics.steps} steps, "
          f"replacement {metrics.replacement}; F = {forwards} forwards per image; passes of at most "
          f"{pass_batch} images (the service's CPU pass batch), the curves' passes {chunk}.")
    print("Parameters: " + "; ".join(f"{n}: {describe(p)}" for n, p in params.items()) + ".")
    print()

    # The warm-up calls: one each way, per method; the one with metrics is also the agreement's.
    results: dict[str, list] = {}
    for name in methods:
        method = METHODS[name]
        explain(model, method, x, [None] * batch, params[name], max_batch=pass_batch)
        spent, _ = timed(lambda name=name, method=method: results.__setitem__(
            name, explain(model, method, x, [None] * batch, params[name], max_batch=pass_batch,
                          metrics=metrics)))
        print(f"  {name}: explained with metrics in {spent:.1f} s", file=sys.stderr, flush=True)

    # --- agreement
    card = model.card.preprocess
    x_np = x.cpu().numpy()
    base = independent_substrate(x_np, metrics.replacement, tuple(card.mean), tuple(card.std))
    module = model.module
    targets_by_method = {name: np.array([r.target for r in results[name]]) for name in methods}
    targets = targets_by_method[methods[0]]
    floor = noise_floor(module, x, torch.from_numpy(base).to(device), torch.from_numpy(targets).to(device),
                        pass_batch)
    # The random order is the same for every method (seed 0, the image's size): Quantus plays it once per
    # set of targets (every method here explains the top-1 class, so once).
    random_ranks = np.broadcast_to(order_ranks(random_order(height * width, 0).numpy(), (height, width)),
                                   (batch, height, width)).copy()
    random_curves: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    rows, failed, worst = [], [], 0.0
    random_rows = []
    for name in methods:
        found = results[name]
        t = targets_by_method[name]
        ranks = np.stack([tie_free_ranks(r.heatmap.numpy()) for r in found])
        deletion, insertion = quantus_curves(quantus, module, x_np, base, ranks, t, metrics.steps,
                                             str(device))
        if t.tobytes() not in random_curves:
            random_curves[t.tobytes()] = quantus_curves(quantus, module, x_np, base, random_ranks, t,
                                                        metrics.steps, str(device))
        deletion_r, insertion_r = random_curves[t.tobytes()]
        for b, r in enumerate(found):
            m = r.metrics
            diffs = [float(np.abs(np.asarray(m[key]) - q[b]).max()) for key, q in (
                ("deletion_curve", deletion), ("insertion_curve", insertion),
                ("deletion_curve_random", deletion_r), ("insertion_curve_random", insertion_r))]
            worst = max(worst, *diffs)
            ok = max(diffs) <= TOLERANCE
            if not ok:
                failed.append(f"{name}/{names[b]}")
            rows.append(f"| {name} | {names[b]} | {m['deletion_auc']:.4f} | {auc(deletion[b]):.4f} | "
                        f"{diffs[0]:.1e} | {m['insertion_auc']:.4f} | {auc(insertion[b]):.4f} | "
                        f"{diffs[1]:.1e} | "
                        f"{'PASS' if ok else 'FAIL'} |")
            random_rows.append((name, b, m, diffs[2:], deletion_r[b], insertion_r[b]))

    print(f"### Agreement with Quantus (tolerance {TOLERANCE:.0e} on every curve point)")
    print()
    print(f"float32 noise floor: the same {2 * batch} images (photos and substrates) in passes of 1, "
          f"{2 * batch} and {pass_batch}: target probabilities differ by up to {floor:.1e}.")
    print()
    print("| method | photo | deletion AUC | Quantus PF | max abs diff | insertion AUC | Quantus PF from "
          "the substrate | max abs diff | all 4 curves |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print()
    print("Random order (seed 0, the same for every method): our AUCs (equal across methods up to the floor) "
          "and Quantus's with that order; max abs diff over the methods.")
    print()
    print("| photo | deletion AUC random | Quantus PF | max abs diff | insertion AUC random | "
          "Quantus PF from the substrate | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b in range(batch):
        mine = [row for row in random_rows if row[1] == b]
        m, dr, ir = mine[0][2], mine[0][4], mine[0][5]
        print(f"| {names[b]} | {m['deletion_auc_random']:.4f} | {auc(dr):.4f} | "
              f"{max(row[3][0] for row in mine):.1e} | {m['insertion_auc_random']:.4f} | {auc(ir):.4f} | "
              f"{max(row[3][1] for row in mine):.1e} |")
    print()
    print(f"Agreement: **{'PASS' if not failed else 'FAIL'}**, largest difference {worst:.1e} "
          f"(tolerance {TOLERANCE:.0e}){'; failed: ' + ', '.join(failed) if failed else ''}.")
    print()

    # --- cost
    plain = x.repeat(math.ceil(chunk / batch), 1, 1, 1)[:chunk].contiguous()
    curve_passes = math.ceil(batch * forwards / chunk)
    probe = max(1, curve_passes // 4)  # plain passes timed per round: a quarter of the curves' passes

    def forward() -> None:
        with torch.no_grad():
            for _ in range(probe):
                module(plain)

    forward()
    cost_rows: list[str] = []
    over: dict[int, list[str]] = {0: [], 1: []}
    for name in methods:
        method = METHODS[name]
        without, with_metrics, fwd = [], [], []
        for _ in range(args.repeats):
            without.append(timed(lambda method=method, name=name: explain(
                model, method, x, [None] * batch, params[name], max_batch=pass_batch)))
            with_metrics.append(timed(lambda method=method, name=name: explain(
                model, method, x, [None] * batch, params[name], max_batch=pass_batch, metrics=metrics)))
            wall, cpu = timed(forward)
            fwd.append((wall / (probe * chunk), cpu / (probe * chunk)))
        row, ratios = cost_row(name, without, with_metrics, fwd, batch * forwards)
        cost_rows.append(row)
        for clock, ratio in enumerate(ratios):
            if ratio > BOUND:
                over[clock].append(name)
        print(f"  {name}: timed", file=sys.stderr, flush=True)

    def verdict(names: list[str]) -> str:
        return "**PASS**" if not names else f"**FAIL** ({', '.join(names)})"

    print(f"### Cost (medians of {args.repeats} interleaved rounds, {batch} images a call; each cell wall "
          "clock / process CPU time)")
    print()
    print(f"| method | explain s | with metrics s | forward ms per image (passes of {chunk}) | "
          "measured ratio | expected ratio | measured / expected |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(cost_rows))
    print()
    print(f"Expected ratio = (t_method + {batch} x {forwards} x t_fwd) / t_method, t_fwd from {probe} plain "
          f"passes of {chunk} a round. Bound: measured / expected <= {BOUND}: wall clock {verdict(over[0])}, "
          f"CPU time {verdict(over[1])}. {time.perf_counter() - started:.0f} s in all.")
    return 0 if not failed and not (over[0] and over[1]) else 1

if __name__ == "__main__":
    sys.exit(main())
