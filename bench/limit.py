"""The yardstick: raw forward+backward throughput, and each method's efficiency against it.

    .venv/bin/python bench/limit.py [--quick] [--arch resnet50] [--device cuda] [--precision bf16]

raw = one forward and one backward to the input (frozen weights, what every method needs) at batch
sizes 1..64. A method costs a known number of passes per image (Grad-CAM and FullGrad 1, IG n_steps,
SmoothGrad n_samples, MoreauGrad iterations x n_samples); its efficiency is

    efficiency = passes x (raw seconds per image at the batch the method runs) / measured seconds per image

so 1.0 means it spends nothing beyond the limit (Grad-CAM can beat 1: its backward stops at its layer).
The service line measures Grad-CAM through the HTTP service under 16 concurrent clients.
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

from service.calibrate import calibrate_lane  # noqa: E402
from service.engine import AUTOCAST, explain  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.methods.passes import input_gradients  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.zoo import ModelRegistry, resolve_device, set_cudnn_autotuning  # noqa: E402
from service.zoo.fold import fold_batchnorms  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def load(arch: str, device):
    registry = ModelRegistry.from_dir(ROOT / "models", device, only={"efficientnet_lite0"})
    model = registry.models["efficientnet_lite0"]
    if arch == "resnet50":  # random weights: timing only
        import torchvision

        module = torchvision.models.resnet50().eval().requires_grad_(False).to(device)
        module, _ = fold_batchnorms(module, torch.randn(2, 3, 224, 224, device=device))  # as load_model does
        module.to(memory_format=torch.channels_last)  # as service/zoo/registry.py loads every model
        model.module = module
        model.cam_layers = {"layer4": (2048, 7, 7)}
        cam = model.card.cam.model_copy(update={"target_layer": "layer4"})
        model.card = model.card.model_copy(update={"cam": cam})
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", default="efficientnet_lite0", choices=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    set_cudnn_autotuning(device.type == "cuda")  # fixed shapes: the yardstick takes cuDNN's fastest kernels
    model = load(args.arch, device)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.quick:
        sizes = [b for b in sizes if b <= 8]
    repeats = 2 if args.quick else 3
    autocast = dict(device_type=device.type, dtype=AUTOCAST.get(args.precision, torch.float32),
                    enabled=args.precision != "fp32")
    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device {device} ({processor}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"model {args.arch}, {args.precision}\n")

    raw = {}
    print("| batch | raw fwd+bwd img/s | ms per image |\n|---:|---:|---:|")
    for b in sizes:
        x = torch.randn(b, 3, 224, 224, device=device)
        t = torch.zeros(b, dtype=torch.long, device=device)
        with torch.autocast(**autocast):
            # timed calls it before returning; `x=x, t=t` binds them anyway (ruff B023)
            seconds = timed(lambda x=x, t=t: input_gradients(model.module, x, t), device, repeats)
        raw[b] = seconds / b
        print(f"| {b} | {b / seconds:.1f} | {1000 * seconds / b:.1f} |")

    def raw_at(images_per_pass: int) -> float:
        usable = [b for b in raw if b <= images_per_pass] or [min(raw)]
        return raw[max(usable)]

    steps, samples = (8, 8) if args.quick else (50, 25)  # the defaults; fewer for a smoke run
    mg_samples = 8 if args.quick else 32
    cases = [("gradcam", {}, 1), ("fullgrad", {}, 1), ("gradient", {}, 1),
             ("integrated-gradients", {"n_steps": steps}, steps),
             ("smoothgrad", {"n_samples": samples}, samples),
             ("moreaugrad", {"iterations": 3, "n_samples": mg_samples}, 3 * mg_samples)]
    # The service's pass batch: on a CPU cpu_pass_batch, lowered for glibc's mmap threshold
    # (service/calibrate.py); on a GPU the cap.
    settings = Settings()
    pass_batch = (calibrate_lane({"model": model}, settings)["model"] if device.type == "cpu"
                  else settings.max_pass_batch)
    print(f"\npasses of at most {pass_batch} images, as the service runs them on this device")
    if args.precision != "fp32":
        print("the yardstick is a whole-pass autocast; gradient, IG, SmoothGrad and MoreauGrad run their "
              "forward in fp32 and only the backward reduced (the precision policy, service/engine.py), "
              "so they cannot reach it")
    print("\n| method | batch | passes/img | ms per image | limit ms per image | efficiency |\n"
          "|---|---:|---:|---:|---:|---:|")
    for batch in [b for b in (1, 8) if b in raw]:
        x = torch.randn(batch, 3, 224, 224, device=device)
        for name, params, passes in cases:
            p = METHODS[name].Params(precision=args.precision, **params)
            # timed calls it before returning; the defaults bind the loop's values anyway (ruff B023)
            seconds = timed(lambda name=name, x=x, batch=batch, p=p:
                            explain(model, METHODS[name], x, [None] * batch, p, max_batch=pass_batch),
                            device, 1 if passes > 8 else repeats) / batch
            per_pass_batch = min(pass_batch, batch * (params.get("n_steps") or params.get("n_samples") or 1))
            limit = passes * raw_at(per_pass_batch)
            print(f"| {name} | {batch} | {passes} | {1000 * seconds:.1f} | {1000 * limit:.1f} "
                  f"| {limit / seconds:.2f} |")


if __name__ == "__main__":
    main()
