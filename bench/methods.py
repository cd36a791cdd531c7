#!/usr/bin/env python
"""Benchmark (not a test): the engine's saliency methods against peer libraries doing the same work.

For each method and batch size it prints the median time per image (wall clock by default) of our
`Method.attribute` and of the peer library called the way a user calls it (one call per batch, model in
eval mode), and the ratio ours / peer (< 1: we are faster). Before any timing it checks that both sides
compute the same thing: Grad-CAM maps must correlate (Pearson > 0.9 at input size), IG and the plain
gradient must be equal to a tolerance, FullGrad must use the same bias layers. A row whose check fails gets
no ratio, and the script exits with status 1.

    .venv/bin/python bench/methods.py                # efficientnet_lite0 card, device auto (CUDA if any)
    .venv/bin/python bench/methods.py --quick        # one timed call per side instead of up to three
    .venv/bin/python bench/methods.py --threads 1 --clock cpu   # on a shared CPU: CPU time, one thread
    .venv/bin/python bench/methods.py --arch resnet50 --device cuda --batch-sizes 1,8,32

Peers: pytorch-grad-cam (GradCAM, FullGrad) and Captum (IntegratedGradients, NoiseTunnel(Saliency),
Saliency). MoreauGrad has no peer library: it is reported alone, against the cost of a plain gradient.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine import precision_scope  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.methods.base import Explainee  # noqa: E402
from service.methods.fullgrad import COMPLETE_TOLERANCE, bias_layers, clamp_layers  # noqa: E402
from service.methods.integrated_gradients import make_baseline  # noqa: E402
from service.methods.postprocess import heatmap  # noqa: E402
from service.zoo import (  # noqa: E402
    ModelRegistry,
    Preprocessor,
    load_model,
    read_card,
    resolve_device,
    set_cudnn_autotuning,
)
from service.zoo.fold import fold_batchnorms  # noqa: E402
from service.zoo.reshape import identity  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # skimage.data, repeated in order to fill a batch
ALL_METHODS = ("gradcam", "fullgrad", "integrated-gradients", "smoothgrad", "gradient", "moreaugrad")
GRADCAM_MIN_PEARSON = 0.9
IG_RTOL = 1e-4  # max |ours - Captum| relative to max |Captum|
GRADIENT_RTOL = 1e-5
REDUCED_MIN_PEARSON = 0.99  # the bar for autocast against float32, per image

Call = Callable[[torch.Tensor, torch.Tensor], object]  # (x, targets) -> anything


# ------------------------------------------------------------------------------------------------ setup

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0",
                   help="model card in models/ (default: %(default)s)")
    p.add_argument("--arch", choices=["resnet50"], default=None,
                   help="time torchvision's resnet50 with random weights instead of a card's model")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side, median reported (default 3)")
    p.add_argument("--quick", action="store_true", help="one timed call per side (after the warm-up)")
    p.add_argument("--budget", type=float, default=15.0,
                   help="seconds: start no further timed round of a measurement once its timed calls "
                        "took this long in all; one round is always timed; 0 = always --repeats "
                        "(default %(default)g)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="our images per forward pass, also Captum IG's internal_batch_size (default: the "
                        "service's for the device: cpu_pass_batch on a CPU, max_pass_batch on a GPU)")
    p.add_argument("--ig-steps", type=int, default=16, help="IG n_steps, both sides (service default 50)")
    p.add_argument("--sg-samples", type=int, default=10, help="SmoothGrad samples, both sides (default 25)")
    p.add_argument("--moreau-iterations", type=int, default=5, help="MoreauGrad iterations (default 200)")
    p.add_argument("--moreau-samples", type=int, default=8, help="MoreauGrad samples per step (default 32)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads, and OpenCV's thread count to match (default: theirs)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: time.perf_counter (default); cpu: time.process_time, this process's CPU "
                        "time over all its threads; on a shared machine, with --threads 1, it approximates "
                        "the wall time of an idle one")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="our methods' `precision` parameter; the peers always run float32 (GPU: bf16 vs "
                        "Captum fp32 is an issue-5 target). Under bf16/fp16 the same-work checks compare "
                        "maps by Pearson correlation (>= 0.99) instead of exact equality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fold", action="store_true",
                   help="ours on the model as built, without the service's BatchNorm folding "
                        "(service/zoo/fold.py); the peers always get the model as built, as their users "
                        "hold it")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.quick:
        args.repeats = 1
    unknown = set(args.methods) - set(ALL_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; available: {', '.join(ALL_METHODS)}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.repeats < 1:
        p.error("batch sizes and --repeats must be positive")
    return args


def service_pass_batch(device: torch.device) -> int:
    """Images per forward pass the service uses by default on this device (before GPU memory calibration, and
    before the CPU's cap for glibc's mmap threshold, which applies to a server that retains freed memory)."""
    from service.settings import Settings

    fields = Settings.model_fields
    cap = fields["max_pass_batch"].default
    cpu = fields.get("cpu_pass_batch")
    return cap if device.type == "cuda" or cpu is None else min(cap, cpu.default)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass
class Subject:
    """The model under test: our Explainee (frozen weights, as the service loads it) and its preprocessing."""

    name: str
    explainee: Explainee
    preprocess: Preprocessor
    device: torch.device
    peer_module: nn.Module  # the model as built, the way a peer library's user holds it (BatchNorms unfolded)

    @property
    def module(self) -> nn.Module:
        return self.explainee.module

    def batch(self, photos: list, size: int) -> torch.Tensor:
        """The photos, repeated in order to fill `size`, through the model's own preprocessing."""
        return torch.stack([self.preprocess(photos[i % len(photos)]) for i in range(size)]).to(self.device)


def load_photos() -> list:
    from PIL import Image
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in PHOTOS]


def load_subject(args: argparse.Namespace, device: torch.device, photos: list) -> Subject:
    if args.arch == "resnet50":
        import torchvision

        card = read_card(ROOT / "models" / "resnet50.toml")
        preprocess = Preprocessor(card.preprocess)
        module = torchvision.models.resnet50(weights=None).to(device)
        # Random weights, BatchNorm statistics calibrated on the photos (cumulative average): otherwise every
        # folded BatchNorm bias is exactly 0 and FullGrad's bias terms vanish.
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        module.train()
        with torch.no_grad():
            module(torch.stack([preprocess(p) for p in photos]).to(device))
        module.eval().requires_grad_(False)
        module.to(memory_format=torch.channels_last)  # as service/zoo/registry.py loads every model
        peer_module = module
        if not args.no_fold:  # as load_model does
            module, _ = fold_batchnorms(module, torch.randn(2, 3, *card.preprocess.input_size, device=device))
        explainee = Explainee(module=module, normalize=preprocess.normalize, cam_layer=card.cam.target_layer,
                              reshape=identity, max_batch=args.max_batch)
        return Subject("resnet50 (torchvision, random weights, BatchNorm calibrated on the photos)",
                       explainee, preprocess, device, peer_module)
    registry = ModelRegistry.from_dir(ROOT / "models", device, only={args.model}, fold_norms=not args.no_fold)
    try:
        loaded = registry.get(args.model)
    except LookupError as exc:
        raise SystemExit(f"error: {exc}") from None
    as_built = (loaded.module if args.no_fold else
                load_model(loaded.card, ROOT / "models", device, fold_norms=False).module)
    return Subject(f"{loaded.name} ({loaded.card.architecture}, {loaded.card.description})",
                   loaded.explainee(args.max_batch), loaded.preprocess, device, as_built)


def machine_lines(device: torch.device) -> list[str]:
    model_name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model_name is None:
                model_name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cpu = model_name or platform.processor() or "unknown CPU"
    isa = "/".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags) or "?"

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    lines = [f"- CPU: {cpu} ({isa}), {os.cpu_count()} logical cores; torch threads: "
             f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
             f"- Python {platform.python_version()}, torch {torch.__version__}, "
             f"torchvision {version('torchvision')}, timm {version('timm')}, captum {version('captum')}, "
             f"grad-cam {version('grad-cam')}, "
             f"opencv {version('opencv-python-headless')}, numpy {np.__version__}",
             f"- device: {device}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")]
    if hasattr(os, "getloadavg"):
        lines.append("- load average (1, 5, 15 min) at the start: "
                     + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return lines


def progress(msg: str) -> None:
    print(f"[bench {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- timing

def time_pair(ours: Callable[[], object], peer: Callable[[], object] | None, repeats: int,
              sync: Callable[[], None], budget_s: float = 0.0,
              clock: Callable[[], float] = time.perf_counter) -> tuple[float, float | None, int]:
    """(median seconds per call of ours, of the peer, timed calls per side).

    One warm-up call each first; then timed rounds alternate ours and the peer, so drift on a shared machine
    hits both alike. After the first round no new round starts once this measurement's timed calls took
    `budget_s` seconds in all (0: always `repeats` rounds).
    """
    calls = {"ours": ours, **({"peer": peer} if peer else {})}
    times: dict[str, list[float]] = {key: [] for key in calls}
    for fn in calls.values():
        fn()
        sync()
    for round_ in range(repeats):
        if round_ and budget_s and sum(map(sum, times.values())) >= budget_s:
            break
        for key, fn in calls.items():
            sync()
            start = clock()
            fn()
            sync()
            times[key].append(clock() - start)
    peer_s = statistics.median(times["peer"]) if peer else None
    return statistics.median(times["ours"]), peer_s, len(times["ours"])


# ---------------------------------------------------------------------------------------- peer helpers

def trainable_copy(module: nn.Module) -> nn.Module:
    """The model as a user holds it: weights requiring grad, eval mode (pytorch-grad-cam needs the former:
    it hooks tensors that require grad and calls loss.backward())."""
    return copy.deepcopy(module).eval().requires_grad_(True)


def unfuse_norm_act(module: nn.Module) -> int:
    """In place: timm's fused BatchNormAct2d (a BatchNorm2d subclass) -> Sequential(BatchNorm2d, drop, act)
    with the same weights. Same function, but pytorch-grad-cam's FullGrad, which matches layer types exactly,
    then sees the BatchNorm biases. Returns how many layers were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if (isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d
                and isinstance(getattr(child, "act", None), nn.Module)):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                affine=child.affine, track_running_stats=child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn = bn.to(child.running_mean.device).train(child.training)
            bn.requires_grad_(child.weight.requires_grad)
            setattr(module, name, nn.Sequential(bn, getattr(child, "drop", nn.Identity()), child.act))
            count += 1
        else:
            count += unfuse_norm_act(child)
    return count


def cam_targets(targets: torch.Tensor) -> list:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(int(t)) for t in targets.tolist()]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def per_image_pearson(ours: torch.Tensor, peer: np.ndarray) -> list[float]:
    ours_np = ours.detach().float().cpu().numpy()
    return [pearson(ours_np[i], np.asarray(peer[i])) for i in range(ours_np.shape[0])]


def relative_error(ours: torch.Tensor, peer: torch.Tensor) -> float:
    peer = peer.detach().float().cpu()
    return float((ours.detach().float().cpu() - peer).abs().max() / peer.abs().max().clamp_min(1e-30))


def fmt(values: list[float], spec: str = ".3f") -> str:
    return ", ".join(format(v, spec) for v in values)


def verdict(ok: bool) -> str:
    return "OK" if ok else "FAILED"


# ------------------------------------------------------------------------------------------ comparisons

@dataclass
class Comparison:
    """One method against its peer: one call per batch for each, and whether the same-work check passed."""

    key: str
    label: str  # the table's method cell
    ours: Call
    peer: Call | None
    passes: int = 1  # forward+backward passes per image
    ok: bool = True
    release: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class Context:
    args: argparse.Namespace
    subject: Subject
    x: torch.Tensor  # the check batch: the four photos
    targets: torch.Tensor
    notes: list[str] = field(default_factory=list)

    def params(self, key: str, **values):
        """`key`'s parameters with the requested precision (the peers always run float32)."""
        return METHODS[key].Params(precision=self.args.precision, **values)

    def ours(self, key: str, params) -> Call:
        method, explainee = METHODS[key], self.subject.explainee

        def run(x, targets):
            # The precision context engine.explain puts around a method (fp32: none).
            scope, _ = precision_scope(key, params, self.subject.device)
            with scope:
                result = method.attribute(explainee, x, targets, params)
            # What engine.explain does with the result (no-ops on the CPU).
            return result.heatmap.float().cpu(), result.attribution.float().cpu(), result

        return run

    def note_folding(self, key: str, ours: torch.Tensor, as_built: torch.Tensor) -> None:
        """How far ours is from the peer on the model as built (BatchNorms unfolded): information only, the
        exact check above is against the same module. Folding computes the same function with other float32
        rounding, and a ReLU6 unit at its clip can flip, so gradients differ where that happens."""
        if self.subject.peer_module is self.subject.module:
            return
        as_built = as_built.detach().float().cpu()
        corr = per_image_pearson(ours, as_built.numpy())
        self.notes.append(f"{key}: the peer on the model as built (BatchNorms unfolded, as timed): "
                          f"max|ours - peer| / max|peer| = {relative_error(ours, as_built):.1e}, "
                          f"Pearson per image {fmt(corr, '.5f')}")


def reduced_check(ctx: Context, key: str, ours: torch.Tensor, peer: torch.Tensor) -> bool:
    """Under a reduced precision ours cannot equal the float32 peer: the check is the issue's autocast bar,
    Pearson >= 0.99 per image between our attributions and the peer's float32 ones (the exact-equality
    line of the note then reads as information)."""
    corr = per_image_pearson(ours, peer.detach().float().cpu().numpy())
    ok = min(corr) >= REDUCED_MIN_PEARSON
    ctx.notes.append(f"check {key} at {ctx.args.precision} (peer float32): Pearson of the attributions per "
                     f"image = {fmt(corr, '.4f')} -> {verdict(ok)} (need >= {REDUCED_MIN_PEARSON})")
    return ok


def exactness(ctx: Context, exact: bool) -> str:
    """The verdict of an exact-equality check: the check itself in float32, information otherwise."""
    if ctx.args.precision == "fp32":
        return verdict(exact)
    return f"{'met' if exact else 'not met'} (information: ours ran {ctx.args.precision})"


def compare_gradcam(ctx: Context) -> list[Comparison]:
    from pytorch_grad_cam import GradCAM

    params = ctx.params("gradcam")
    layer = params.layer or ctx.subject.explainee.cam_layer
    ours = ctx.ours("gradcam", params)

    def peer_on(model: nn.Module, input_grad: bool) -> tuple[Call, Callable[[], None]]:
        cam = GradCAM(model=model, target_layers=[model.get_submodule(layer)])

        def call(x, t):
            x = x.detach().requires_grad_(True) if input_grad else x
            return cam(input_tensor=x, targets=cam_targets(t))

        return call, cam.activations_and_grads.release

    peer, release = peer_on(trainable_copy(ctx.subject.peer_module), input_grad=False)
    heat = ours(ctx.x, ctx.targets)[0]
    corr = per_image_pearson(heat, peer(ctx.x, ctx.targets))
    ok = min(corr) > GRADCAM_MIN_PEARSON
    ctx.notes.append(f"check gradcam (layer `{layer}`): Pearson(ours, pytorch-grad-cam) per image at "
                     f"{tuple(heat.shape[-2:])} = {fmt(corr, '.4f')} -> {verdict(ok)} "
                     f"(need > {GRADCAM_MIN_PEARSON})")
    # The same peer on frozen weights with an input that requires grad: not its documented use, but it takes
    # the weight gradients out of its backward(), which is what the first row pays for.
    frozen, release_frozen = peer_on(copy.deepcopy(ctx.subject.peer_module).eval().requires_grad_(False),
                                     True)
    return [Comparison("gradcam", f"gradcam vs pytorch_grad_cam.GradCAM (layer `{layer}`)", ours, peer, ok=ok,
                       release=[release]),
            Comparison("gradcam", "gradcam vs GradCAM on frozen weights, input requires grad", ours, frozen,
                       ok=ok, release=[release_frozen])]


def compare_fullgrad(ctx: Context) -> list[Comparison]:
    from pytorch_grad_cam import FullGrad

    module = ctx.subject.module
    ours = ctx.ours("fullgrad", ctx.params("fullgrad"))
    hooked, _, _ = bias_layers(module)
    ours_maps = sum(1 for name in hooked if not isinstance(module.get_submodule(name), nn.Linear))
    as_shipped = FullGrad(trainable_copy(ctx.subject.peer_module), [])
    shipped_layers = len(as_shipped.target_layers)
    as_shipped.activations_and_grads.release()
    peer_model = trainable_copy(ctx.subject.peer_module)
    unfused = unfuse_norm_act(peer_model)
    same_function = True
    if unfused:
        with torch.no_grad():
            same_function = torch.allclose(peer_model(ctx.x), module(ctx.x), rtol=1e-5, atol=1e-5)
        ctx.notes.append(
            f"fullgrad: pytorch-grad-cam's FullGrad picks bias layers by exact type (Conv2d, BatchNorm2d) "
            f"and finds {shipped_layers} of our {ours_maps} on this model as shipped (timm fuses BatchNorm "
            f"and activation into BatchNormAct2d), so there it computes input x gradient only. It is timed "
            f"on a copy with the {unfused} BatchNormAct2d unfused into Sequential(BatchNorm2d, act), same "
            f"weights (same outputs: {same_function}).")
    cam = FullGrad(peer_model, [])
    peer_layers = len(cam.target_layers)

    def peer(x, t):
        return cam(input_tensor=x, targets=cam_targets(t))

    heat, _, result = ours(ctx.x, ctx.targets)
    corr = per_image_pearson(heat, peer(ctx.x, ctx.targets))
    ok = peer_layers == ours_maps and same_function
    gaps = [d["completeness_gap"] for d in result.diagnostics]
    ctx.notes.append(
        f"check fullgrad: bias layers with a map, ours {ours_maps} (+{len(hooked) - ours_maps} linear, only "
        f"in the completeness sum), peer {peer_layers} -> {verdict(ok)}; ours also counts the clipped units "
        f"of {len(clamp_layers(module))} clamping activations (ReLU6) as implicit biases, the peer does not; "
        f"Pearson(ours, peer) per image = "
        f"{fmt(corr)} (info: the peer min-max scales every channel, ours every layer as the paper's code "
        f"does); our relative completeness gaps {fmt(gaps, '.2g')} ("
        + ("complete to float32 precision)" if max(gaps) <= COMPLETE_TOLERANCE else
           "incomplete: some constant is not a listed bias)"))
    return [Comparison("fullgrad", "fullgrad vs pytorch_grad_cam.FullGrad", ours, peer, ok=ok,
                       release=[cam.activations_and_grads.release])]


def compare_ig(ctx: Context) -> list[Comparison]:
    from captum.attr import IntegratedGradients

    params = ctx.params("integrated-gradients", n_steps=ctx.args.ig_steps)
    ours = ctx.ours("integrated-gradients", params)
    explainee, max_batch = ctx.subject.explainee, ctx.args.max_batch

    def captum_on(module: nn.Module) -> Call:
        ig = IntegratedGradients(module)

        def call(x, t):
            baseline = make_baseline(explainee, x, params)  # the same black-image baseline tensor
            return ig.attribute(x, baselines=baseline, target=t, n_steps=params.n_steps, method=params.method,
                                internal_batch_size=max(max_batch, x.shape[0]), return_convergence_delta=True)
        return call

    # Same work: Captum on the module ours runs (folded). Timed: Captum on the model as its users hold it.
    peer = captum_on(ctx.subject.peer_module)
    _, attribution, result = ours(ctx.x, ctx.targets)
    peer_attribution, peer_delta = captum_on(ctx.subject.module)(ctx.x, ctx.targets)
    ctx.note_folding("integrated-gradients", attribution, peer(ctx.x, ctx.targets)[0])
    err = relative_error(attribution, peer_attribution)
    delta_err = relative_error(torch.tensor([d["convergence_delta"] for d in result.diagnostics]), peer_delta)
    exact = err <= IG_RTOL and delta_err <= IG_RTOL
    ok = exact if ctx.args.precision == "fp32" else reduced_check(ctx, "integrated-gradients", attribution,
                                                                   peer_attribution)
    ctx.notes.append(
        f"check integrated-gradients ({params.n_steps} steps {params.method}, black baseline, "
        f"internal_batch_size {max(max_batch, ctx.x.shape[0])}): max|ours - captum| / max|captum| = "
        f"{err:.1e} (attributions), "
        f"{delta_err:.1e} (convergence deltas) -> {exactness(ctx, exact)} (need <= {IG_RTOL:g}); "
        f"relative deltas {fmt([d['relative_delta'] for d in result.diagnostics], '.2g')} at this n_steps")
    return [Comparison("integrated-gradients", f"integrated-gradients vs captum IntegratedGradients "
                                               f"({params.n_steps} steps)", ours, peer, params.n_steps, ok)]


def compare_smoothgrad(ctx: Context) -> list[Comparison]:
    from captum.attr import NoiseTunnel, Saliency

    params = ctx.params("smoothgrad", n_samples=ctx.args.sg_samples)
    ours = ctx.ours("smoothgrad", params)
    tunnel = NoiseTunnel(Saliency(ctx.subject.peer_module))

    def peer(x, t):
        std = float(params.noise_level * (x.max() - x.min()))  # one absolute std for the whole batch
        return tunnel.attribute(x, nt_type="smoothgrad", nt_samples=params.n_samples, stdevs=std, target=t,
                                abs=False)

    seed_everything(ctx.args.seed)
    heat = ours(ctx.x, ctx.targets)[0]
    peer_attribution = peer(ctx.x, ctx.targets).detach().float().cpu()
    peer_heat = heatmap(peer_attribution, params.aggregation, params.normalization)
    corr = per_image_pearson(heat, peer_heat.numpy())
    ctx.notes.append(
        f"smoothgrad ({params.n_samples} samples, noise {params.noise_level} x (max - min)): same number of "
        f"gradient passes by construction; Pearson of the heat maps per image = {fmt(corr)} (info only: "
        f"other noise draws, and ours scales the noise per image where NoiseTunnel takes one std per batch)")
    label = f"smoothgrad vs captum NoiseTunnel(Saliency) ({params.n_samples} samples)"

    def peer_and_prediction(x, t):
        # Ours also returns the prediction (top-k): a clean no-grad forward NoiseTunnel does not do. A user
        # who shows the predicted class next to the map runs it too; this row compares the same outputs.
        with torch.no_grad():
            ctx.subject.peer_module(x).softmax(1).topk(5)
        return peer(x, t)

    return [Comparison("smoothgrad", label, ours, peer, params.n_samples),
            Comparison("smoothgrad", f"{label} + its prediction forward (same outputs as ours)", ours,
                       peer_and_prediction, params.n_samples)]


def compare_gradient(ctx: Context) -> list[Comparison]:
    from captum.attr import Saliency

    ours = ctx.ours("gradient", ctx.params("gradient"))
    saliency = Saliency(ctx.subject.peer_module)

    def peer(x, t):
        return saliency.attribute(x, target=t, abs=False)

    # Same work: Captum on the module ours runs (folded). Timed: Captum on the model as its users hold it.
    attribution = ours(ctx.x, ctx.targets)[1]
    peer_attribution = Saliency(ctx.subject.module).attribute(ctx.x, target=ctx.targets, abs=False)
    ctx.note_folding("gradient", attribution, peer(ctx.x, ctx.targets))
    err = relative_error(attribution, peer_attribution)
    exact = err <= GRADIENT_RTOL
    ok = (exact if ctx.args.precision == "fp32"
          else reduced_check(ctx, "gradient", attribution, peer_attribution))
    ctx.notes.append(f"check gradient: max|ours - captum Saliency| / max|captum| = {err:.1e} -> "
                     f"{exactness(ctx, exact)} (need <= {GRADIENT_RTOL:g})")
    return [Comparison("gradient", "gradient vs captum Saliency(abs=False)", ours, peer, ok=ok)]


def compare_moreaugrad(ctx: Context) -> list[Comparison]:
    params = ctx.params("moreaugrad", iterations=ctx.args.moreau_iterations,
                        n_samples=ctx.args.moreau_samples)
    label = f"moreaugrad ({params.iterations} iterations x {params.n_samples} samples; no peer library)"
    return [Comparison("moreaugrad", label, ctx.ours("moreaugrad", params), None,
                       params.iterations * params.n_samples)]


COMPARE = {"gradcam": compare_gradcam, "fullgrad": compare_fullgrad, "integrated-gradients": compare_ig,
           "smoothgrad": compare_smoothgrad, "gradient": compare_gradient, "moreaugrad": compare_moreaugrad}


# ------------------------------------------------------------------------------------------------- main

@dataclass
class Row:
    comparison: Comparison
    batch: int
    ours_ms: float
    peer_ms: float | None
    calls: int

    @property
    def ratio(self) -> str:
        if self.peer_ms is None:
            return "—"
        return f"{self.ours_ms / self.peer_ms:.2f}" if self.comparison.ok else "n/a (check failed)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import cv2

        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    seed_everything(args.seed)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("error: --clock cpu measures CPU time only; use it with --device cpu")
    pass_batch_source = "set by --max-batch"
    if args.max_batch is None:
        args.max_batch = service_pass_batch(device)
        pass_batch_source = "the service's default on this device"
    machine = machine_lines(device)  # before the work, so the load average is the machine's, not ours
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    # Fixed shapes here, both sides alike: cuDNN's autotuning pays (the service leaves it off by default).
    set_cudnn_autotuning(device.type == "cuda")
    started = time.perf_counter()
    photos = load_photos()
    subject = load_subject(args, device, photos)

    check_x = subject.batch(photos, len(PHOTOS))
    with torch.no_grad():
        ctx = Context(args, subject, check_x, subject.module(check_x).argmax(1))
    progress("checking that ours and the peers compute the same thing")
    comparisons = [c for key in args.methods for c in COMPARE[key](ctx)]

    rows: list[Row] = []
    forward_ms: dict[int, float] = {}
    for b in args.batch_sizes:
        x = subject.batch(photos, b)
        with torch.no_grad():
            targets = subject.module(x).argmax(1)

        def forward(x=x):
            with torch.no_grad():
                return subject.module(x)

        forward_ms[b] = time_pair(forward, None, args.repeats, sync, clock=clock)[0] / b * 1e3
        for comp in comparisons:
            progress(f"batch {b}: {comp.label}")
            seed_everything(args.seed)
            peer = (lambda comp=comp, x=x, targets=targets: comp.peer(x, targets)) if comp.peer else None
            ours_s, peer_s, calls = time_pair(lambda comp=comp, x=x, targets=targets: comp.ours(x, targets),
                                              peer, args.repeats, sync, args.budget, clock)
            rows.append(Row(comp, b, ours_s / b * 1e3, None if peer_s is None else peer_s / b * 1e3, calls))
            row = rows[-1]  # also now, so a run cut off by a time limit keeps what it measured
            progress(f"| {comp.label} | {b} | {row.ours_ms:.1f} | "
                     f"{'—' if row.peer_ms is None else f'{row.peer_ms:.1f}'} | {row.ratio} |")
    for comp in comparisons:
        for release in comp.release:
            release()
    elapsed = time.perf_counter() - started

    command = " ".join([".venv/bin/python bench/methods.py", *(sys.argv[1:] if argv is None else argv)])
    short = [f"{r.comparison.key} at batch {r.batch}: {r.calls}" for r in rows if r.calls < args.repeats]
    print(f"## Engine: methods vs peers ({'GPU' if device.type == 'cuda' else 'CPU'})\n")
    print(f"Command: `{command}`  ")
    print(f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  ")
    print(f"Model: {subject.name}  ")
    print(f"Precision: ours {args.precision}"
          + (" (engine.precision_scope, as the service runs it)" if args.precision != "fp32" else "")
          + ", peers float32  ")
    clock_name = ("time.perf_counter (wall clock)" if args.clock == "wall"
                  else "time.process_time (this process's CPU time, all threads)")
    print(f"Timing: {clock_name}, one warm-up call per side, then the median of {args.repeats} timed "
          f"call(s) per side, ours and the peer alternating"
          + (f" (fewer where the timed calls passed {args.budget:g} s: {'; '.join(short)})" if short else "")
          + f"; ms/img = call time / batch size; whole run {elapsed:.0f} s.\n")
    print("Machine:\n")
    if hasattr(os, "getloadavg"):
        machine.append("- load average at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
                       + " (this run keeps about 2 busy; more means other work shared the CPU)")
    print("\n".join(machine) + "\n")
    print("| method | batch | ours ms/img | peer ms/img | ratio (ours/peer) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        peer_cell = "—" if r.peer_ms is None else f"{r.peer_ms:.1f}"
        print(f"| {r.comparison.label} | {r.batch} | {r.ours_ms:.1f} | {peer_cell} | {r.ratio} |")
    print("\nSettings and checks:\n")
    print(f"- Settings, identical on both sides: IG n_steps={args.ig_steps} (service "
          f"default 50, gausslegendre), SmoothGrad {args.sg_samples} samples (default 25), MoreauGrad "
          f"{args.moreau_iterations} iterations x {args.moreau_samples} samples (default 200 x 32). Our "
          f"max_batch (images per pass) = {args.max_batch} ({pass_batch_source}); Captum IG gets the same "
          f"internal_batch_size and return_convergence_delta=True; NoiseTunnel runs all noisy copies in one "
          f"pass.")
    print("- Ours = `METHODS[name].attribute(explainee, x, targets, params)` with the top-1 classes as "
          "targets, including our heat-map post-processing and the logits every method returns for the "
          "prediction (IG, SmoothGrad and MoreauGrad get them from one extra no-grad forward; IG's also "
          "gives its convergence delta). One no-grad forward costs "
          + ", ".join(f"{ms:.1f} ms/img at batch {b}" for b, ms in forward_ms.items()) + ".")
    print("- Peers are called as a user would: one call per batch, model in eval mode. pytorch-grad-cam "
          "needs weights that require grad, so its loss.backward() also computes every weight gradient down "
          "to the first layer; it copies activations and gradients to NumPy and resizes every map with "
          "OpenCV on the CPU. Captum is timed on the frozen model as built; the exactness checks run it on "
          "the module ours runs.")
    if subject.peer_module is not subject.module:
        print("- Ours runs the model as the service loads it, each BatchNorm folded into the convolution "
              "before it (service/zoo/fold.py: the same function, one op fewer per layer); the peers get the "
              "model as built, as their users hold it. `--no-fold` gives ours the model as built too.")
    gradient = {r.batch: r.ours_ms for r in rows if r.comparison.key == "gradient"}
    for r in rows:
        if r.comparison.key == "moreaugrad" and r.batch in gradient:
            per_pass = r.ours_ms / r.comparison.passes
            print(f"- moreaugrad at batch {r.batch}: {r.comparison.passes} gradient passes per image, "
                  f"{per_pass:.1f} ms per pass and image = {per_pass / gradient[r.batch]:.2f} x our plain "
                  f"gradient's {gradient[r.batch]:.1f} ms/img at the same batch (its passes run "
                  f"{min(r.batch * args.moreau_samples, args.max_batch)} images at a time)")
    for note in ctx.notes:
        print(f"- {note}")
    failed = sorted({c.label for c in comparisons if not c.ok})
    if failed:
        print(f"\nCHECK FAILED for: {'; '.join(failed)}. Those rows compare different work.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
