#!/usr/bin/env python
"""Probe (not a test): how far each method's heat map moves from float32 under a reduced `precision`.

For EfficientNet-Lite0 on skimage's chelsea it prints the Pearson correlation of the 224x224 map with the
float32 map, (a) with the whole method under plain autocast (what the engine used to do) and (b) under the
engine's policy (service/engine.py, `precision_scope`), in bf16 and fp16, and the share of the conv/linear
FLOPs (forward and backward, counted per dtype) that ran in the reduced dtype under the policy.
`--diagnose` adds the table that located the error: the plain gradient under bf16 variants.

    .venv/bin/python bench/precision.py               # the QUICK settings of tests/test_precision.py
    .venv/bin/python bench/precision.py --defaults    # also default / moderate settings (slower)
    .venv/bin/python bench/precision.py --diagnose    # where the bf16 error enters the gradient map
    .venv/bin/python bench/precision.py --moreau-fp16 # whole-pass fp16 MoreauGrad by draws, on four photos
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine import AUTOCAST, explain  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.methods.postprocess import heatmap  # noqa: E402
from service.zoo import ModelRegistry  # noqa: E402

QUICK = {"integrated-gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4},
         "moreaugrad": {"iterations": 4, "n_samples": 2}}  # as in tests/test_precision.py
LARGER = [("gradient", {}), ("integrated-gradients", {"n_steps": 16}), ("smoothgrad", {}),
          ("moreaugrad", {"iterations": 20, "n_samples": 4})]


class FlopsByDtype(TorchDispatchMode):
    """Sums the FLOPs of matmul/convolution ops (forward and backward) by the dtype they ran in."""

    def __init__(self):
        super().__init__()
        self.flops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.flops[dtype] += count(*args, **(kwargs or {}), out_val=out)
        return out

    def reduced_share(self) -> float:
        total = sum(self.flops.values())
        return 1 - self.flops[torch.float32] / total if total else 0.0


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def engine_map(model, x, name, precision, settings):
    params = METHODS[name].Params(precision=precision, **settings)
    return explain(model, METHODS[name], x, [None], params)[0]


def autocast_map(model, x, name, precision, settings):
    """The whole method under plain autocast: the engine's behaviour before the policy."""
    with torch.autocast(x.device.type, dtype=AUTOCAST[precision]):
        params = METHODS[name].Params(**settings)
        result = METHODS[name].attribute(model.explainee(), x, torch.tensor([-1]), params)
    return result.heatmap[0].float()


def method_table(model, x, cases) -> None:
    print("| method | settings | whole-pass autocast bf16 | policy bf16 | policy fp16 | ran in reduced "
          "precision | reduced share of conv/linear FLOPs |\n|---|---|---:|---:|---:|---|---:|")
    for name, settings in cases:
        ref = engine_map(model, x, name, "fp32", settings).heatmap
        plain = correlation(ref, autocast_map(model, x, name, "bf16", settings))
        counter = FlopsByDtype()
        with counter:
            bf16 = engine_map(model, x, name, "bf16", settings)
        fp16 = engine_map(model, x, name, "fp16", settings).heatmap
        ran = "forward and backward" if bf16.diagnostics["precision_forward"] != "fp32" else "backward only"
        print(f"| {name} | {settings or 'defaults'} | {plain:.4f} | {correlation(ref, bf16.heatmap):.4f} | "
              f"{correlation(ref, fp16):.4f} | {ran} | {counter.reduced_share():.0%} |", flush=True)


# ---------------------------------------------------------------------------------------------- diagnosis
def gradient_map(module: nn.Module, x: torch.Tensor, target: int, scope=None) -> tuple[torch.Tensor, float]:
    """The plain-gradient map (abs_sum, percentile) and the reduced share of FLOPs of its pass."""
    counter = FlopsByDtype()
    with scope or nullcontext(), counter, torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(module(xg)[:, target].sum(), xg)
    return heatmap(grad.float(), "abs_sum", "percentile")[0], counter.reduced_share()


def fp32_islands(module: nn.Module, names: list[str]) -> nn.Module:
    """A copy of the module whose named submodules run with autocast off (inputs widened to float32)."""
    module = copy.deepcopy(module)
    for name in names:
        sub = module.get_submodule(name)
        forward = sub.forward

        def island(*args, _forward=forward):
            with torch.autocast(args[0].device.type, enabled=False):
                return _forward(*[a.float() if a.is_floating_point() else a for a in args])
        sub.forward = island
    return module


class PatternReplay(nn.Module):
    """ReLU6 that records its linear-range mask (0 < x < 6), or replays a recorded one in the backward."""

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None
        self.replay = False

    def forward(self, x):
        if not self.replay:
            self.mask = (x > 0) & (x < 6)
            return x.clamp(0, 6)
        return torch.where(self.mask, x, x.detach().clamp(0, 6))


def diagnose(model, x: torch.Tensor) -> None:
    module, bf16 = model.module, torch.autocast(x.device.type, dtype=torch.bfloat16)
    with torch.no_grad():
        target = int(module(x).argmax())
    ref, _ = gradient_map(module, x, target)
    rows = [("everything bf16 (whole-pass autocast)", *gradient_map(module, x, target, bf16)),
            ("fp32; only the input rounded to bf16", *gradient_map(module, x.bfloat16().float(), target))]
    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() > 1:  # conv and linear weights
                p.copy_(p.bfloat16().float())
    rows.append(("fp32; only conv/linear weights rounded to bf16", *gradient_map(rounded, x, target)))

    replay = copy.deepcopy(module)
    relus = [(n, m) for n, m in replay.named_modules() if isinstance(m, nn.ReLU6)]
    for n, _ in relus:
        parent, _, leaf = n.rpartition(".")
        setattr(replay.get_submodule(parent) if parent else replay, leaf, PatternReplay())
    units = [m for m in replay.modules() if isinstance(m, PatternReplay)]

    def patterns(scope):
        for u in units:
            u.replay = False
        gradient_map(replay, x, target, scope)
        return [u.mask for u in units]

    fp32_pattern, bf16_pattern = patterns(None), patterns(bf16)
    flips = sum(int((a != b).sum()) for a, b in zip(fp32_pattern, bf16_pattern, strict=False))
    flipped = flips / sum(a.numel() for a in fp32_pattern)
    for label, pattern, scope in [
            ("bf16 forward's ReLU6 pattern, fp32 backward", bf16_pattern, None),
            ("fp32 forward's ReLU6 pattern, bf16 forward+backward", fp32_pattern, bf16)]:
        for u, mask in zip(units, pattern, strict=False):
            u.mask, u.replay = mask, True
        rows.append((label, gradient_map(replay, x, target, scope)[0], float("nan")))

    convs = {n: m for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    islands = {"stem (conv_stem, bn1)": ["conv_stem", "bn1"],
               "head (conv_head, bn2, classifier)": ["conv_head", "bn2", "classifier"],
               "all depthwise convs": [n for n, m in convs.items() if m.groups > 1],
               "all 1x1 convs": [n for n, m in convs.items() if m.groups == 1 and m.kernel_size == (1, 1)],
               "all BN+activation": [n for n, m in module.named_modules()
                                     if type(m).__name__ == "BatchNormAct2d"]}
    islands |= {f"stem + blocks 0-{k}": ["conv_stem", "bn1"] + [f"blocks.{i}" for i in range(k + 1)]
                for k in range(len(module.blocks))}
    for label, names in islands.items():
        hm, share = gradient_map(fp32_islands(module, names), x, target, bf16)
        rows.append((f"bf16 with fp32 islands: {label}", hm, share))

    print(f"\nPlain gradient (target {target}), bf16 variants; ReLU6 units whose linear-range mask flips "
          f"under bf16: {flipped:.2%}\n")
    print("| variant | correlation with fp32 | reduced share of conv/linear FLOPs |\n|---|---:|---:|")
    for label, hm, share in rows:
        print(f"| {label} | {correlation(ref, hm):.4f} | {'—' if share != share else f'{share:.0%}'} |")


def moreau_fp16_table(model) -> None:
    """MoreauGrad under whole-pass fp16 autocast against float32, by iterations x samples: the measurement
    behind engine.WHOLE_PASS_FP16_MIN_DRAWS."""
    from PIL import Image
    from skimage import data

    print("| photo | iterations x samples | whole-pass fp16 | engine fp16 ran forward in |\n"
          "|---|---|---:|---|")
    for photo in ("chelsea", "coffee", "astronaut", "rocket"):
        x = model.preprocess(Image.fromarray(getattr(data, photo)()).convert("RGB")).unsqueeze(0)
        for settings in ({"iterations": 4, "n_samples": 2}, {"iterations": 20, "n_samples": 4},
                         {"iterations": 50, "n_samples": 8}):
            ref = engine_map(model, x, "moreaugrad", "fp32", settings).heatmap
            whole = correlation(ref, autocast_map(model, x, "moreaugrad", "fp16", settings))
            ran = engine_map(model, x, "moreaugrad", "fp16", settings).diagnostics["precision_forward"]
            print(f"| {photo} | {settings['iterations']} x {settings['n_samples']} | {whole:.4f} | {ran} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defaults", action="store_true", help="also default / moderate settings")
    parser.add_argument("--diagnose", action="store_true",
                        help="where the bf16 error enters the gradient map")
    parser.add_argument("--moreau-fp16", action="store_true",
                        help="only the whole-pass fp16 MoreauGrad table (four photos, three draw counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image
    from skimage import data

    model = ModelRegistry.from_dir(ROOT / "models", torch.device("cpu"), only={"efficientnet_lite0"}).models[
        "efficientnet_lite0"]
    x = model.preprocess(Image.fromarray(data.chelsea())).unsqueeze(0)
    print(f"EfficientNet-Lite0, chelsea, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    if args.moreau_fp16:
        moreau_fp16_table(model)
        return
    method_table(model, x, [(name, QUICK.get(name, {})) for name in sorted(METHODS)])
    if args.defaults:
        print()
        method_table(model, x, LARGER)
    if args.diagnose:
        diagnose(model, x)


if __name__ == "__main__":
    main()
