"""Attention relevance (Chefer et al. 2021) against Grad-CAM on the same ViT, same process, interleaved.

    .venv/bin/python bench/attention.py [--device cpu] [--batch-sizes 1,8] [--repeats 5] [--threads N]

The ViT is timm's vit_small_patch16_224 (embed 384, 12 blocks of 6 heads, 197 tokens) with random weights
(pretrained=False: nothing is downloaded). Grad-CAM reads blocks.11.norm1, the layer pytorch-grad-cam's README
uses for ViTs, its tokens reshaped to the 14 x 14 grid; its backward stops there. Attention relevance runs the
attention unfused and back-propagates to the first block's attention probabilities. The plain input gradient
(fused attention, the whole backward) is printed as the yardstick of one forward+backward.

Prints the median ms per image of each over `repeats` rounds, the methods taking turns within each round, and
the ratio attention-relevance / Grad-CAM.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.methods import METHODS, Explainee  # noqa: E402

PREFIX = 1  # vit_small_patch16_224: the class token


def patch_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, 1 + 196, C) -> (B, C, 14, 14)."""
    patches = t[:, PREFIX:]
    return patches.reshape(t.shape[0], 14, 14, t.shape[-1]).permute(0, 3, 1, 2)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    import timm

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch16_224", pretrained=False).eval().requires_grad_(False).to(device)
    model = Explainee(net, cam_layer="blocks.11.norm1", reshape=patch_tokens)
    methods = [("gradcam", "Grad-CAM"), ("attention-relevance", "attention relevance"),
               ("gradient", "input gradient")]
    print(f"vit_small_patch16_224 (random weights) on {args.device} ({cpu_name()}), "
          f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads; "
          f"{args.repeats} interleaved rounds, medians, ms per image\n")
    print("| batch | " + " | ".join(title for _, title in methods) + " | attention relevance / Grad-CAM |")
    print("|---:|" + "---:|" * (len(methods) + 1))
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)).to(device)
        targets = torch.full((batch,), -1, device=device)
        times: dict[str, list[float]] = {name: [] for name, _ in methods}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for name, _ in methods:
                method = METHODS[name]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                method.attribute(model, x, targets, method.Params())
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_:
                    times[name].append((time.perf_counter() - start) * 1000 / batch)
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"| {batch} | " + " | ".join(f"{medians[name]:.1f}" for name, _ in methods)
              + f" | {medians['attention-relevance'] / medians['gradcam']:.2f}x |")


if __name__ == "__main__":
    main()
