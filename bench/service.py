"""Service throughput and latency under 1, 4 and 16 concurrent clients, against the peer library doing the
same work in-process one image at a time (pytorch-grad-cam for Grad-CAM, Captum for IG), as ratios.

    .venv/bin/python bench/service.py [--quick]

The server runs as a separate process (`python -m service`) on a loopback port; the peers run in this
process on the same model and the same preprocessed photos. Also prints the service overhead: p50 latency
of one Grad-CAM request on an idle server minus the in-process compute of the same work.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import socket
import statistics
import subprocess
import threading
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.engine import explain  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.zoo import ModelRegistry  # noqa: E402


def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(img).convert("RGB") for img in (data.chelsea(), data.coffee(), data.astronaut(),
                                                            data.rocket())]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    # The result cache off: repeated photos must cost real passes, or the service would be flattered.
    env = {**os.environ, "SALIENCY_MODELS": '["efficientnet_lite0"]', "SALIENCY_LOG_LEVEL": "warning",
           "SALIENCY_CACHE_BYTES": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def load(base: str, method: str, blobs: list[bytes], params: dict, clients: int, requests: int):
    """Latencies (s) of `requests` calls from `clients` concurrent clients, and the wall time."""
    local = threading.local()

    def one(i: int) -> float:
        if not hasattr(local, "client"):  # one keep-alive connection per client thread, as real clients do
            local.client = httpx.Client(timeout=600)
        t = time.perf_counter()
        r = local.client.post(f"{base}/v1/explain/{method}", data={k: str(v) for k, v in params.items()},
                              files=[("image", ("x.png", blobs[i % len(blobs)], "image/png"))])
        r.raise_for_status()
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    return latencies, time.perf_counter() - start


def peer_gradcam(model, xs: list[torch.Tensor], repeats: int) -> float:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # A user's model: weights require grad (pytorch-grad-cam backpropagates a loss through them).
    module = copy.deepcopy(model.module).requires_grad_(True)
    layer = module.get_submodule(model.card.cam.target_layer)
    with GradCAM(model=module, target_layers=[layer]) as cam:
        cam(input_tensor=xs[0], targets=[ClassifierOutputTarget(285)])
        t = time.perf_counter()
        for _ in range(repeats):
            for x in xs:
                cam(input_tensor=x, targets=None)  # top-1 class, as the service does by default
        return (time.perf_counter() - t) / (repeats * len(xs))


def peer_ig(model, xs: list[torch.Tensor], n_steps: int, repeats: int) -> float:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model.module)
    black = model.preprocess.normalize(torch.zeros_like(xs[0]))
    t = time.perf_counter()
    for _ in range(repeats):
        for x in xs:
            with torch.no_grad():
                target = int(model.module(x).argmax())
            ig.attribute(x, baselines=black, target=target, n_steps=n_steps, return_convergence_delta=True)
    return (time.perf_counter() - t) / (repeats * len(xs))


def ours_in_process(model, xs, method: str, params: dict, repeats: int) -> float:
    p = METHODS[method].Params(**params)
    explain(model, METHODS[method], xs[0], [None], p)
    t = time.perf_counter()
    for _ in range(repeats):
        for x in xs:
            explain(model, METHODS[method], x, [None], p)
    return (time.perf_counter() - t) / (repeats * len(xs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--ig-steps", type=int, default=16, help="IG n_steps for both sides (CPU: keep it small)")
    args = parser.parse_args()
    torch.manual_seed(0)
    scale = 1 if args.quick else 3
    registry = ModelRegistry.from_dir(ROOT / "models", torch.device("cpu"), only={"efficientnet_lite0"})
    model = registry.models["efficientnet_lite0"]
    images = photos()
    blobs = [png_bytes(im) for im in images]
    xs = [model.preprocess(im).unsqueeze(0) for im in images]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; python {platform.python_version()}")
    cases = {"gradcam": ({}, lambda: peer_gradcam(model, xs, scale), "pytorch-grad-cam GradCAM"),
             "integrated-gradients": ({"n_steps": args.ig_steps},
                                      lambda: peer_ig(model, xs, args.ig_steps, 1), "Captum IntegratedGradients")}
    peer_s = {name: fn() for name, (_, fn, _) in cases.items()}
    ours_s = {"gradcam": ours_in_process(model, xs, "gradcam", {}, scale)}

    port = free_port()
    proc = start_server(port)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        load(base, "gradcam", blobs, {}, 1, 4)  # warm-up
        for name, (params, _, peer_name) in cases.items():
            per_client = (8 if name == "gradcam" else 2) * scale
            for clients in (1, 4, 16):
                n = max(per_client * min(clients, 4), clients)
                latencies, wall = load(base, name, blobs, params, clients, n)
                throughput = n / wall
                peer_tp = 1 / peer_s[name]
                p50 = statistics.median(latencies) * 1000
                p95 = float(np.percentile(latencies, 95)) * 1000
                rows.append((name, clients, n, throughput, p50, p95, peer_tp, throughput / peer_tp, peer_name))
        # Idle latency and in-process compute interleaved, so both see the same machine.
        idle, compute = [], []
        for _ in range(10 * scale):
            idle += load(base, "gradcam", blobs[:1], {}, 1, 3)[0][1:]  # after the connection is open
            compute.append(ours_in_process(model, xs[:1], "gradcam", {}, 1))
        overhead = (statistics.median(idle) - statistics.median(compute)) * 1000
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"\nIG n_steps = {args.ig_steps} on both sides; images: skimage chelsea, coffee, astronaut, rocket\n")
    print("| method | clients | requests | service img/s | p50 ms | p95 ms | peer in-process img/s | ratio | peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, clients, n, tp, p50, p95, peer_tp, ratio, peer_name in rows:
        print(f"| {name} | {clients} | {n} | {tp:.2f} | {p50:.0f} | {p95:.0f} | {peer_tp:.2f} | {ratio:.2f}x | "
              f"{peer_name} |")
    print(f"\nin-process engine Grad-CAM (predict + explain, 1 image): {ours_s['gradcam'] * 1000:.1f} ms")
    print(f"service overhead (idle p50 latency {statistics.median(idle) * 1000:.1f} ms - in-process compute "
          f"{statistics.median(compute) * 1000:.1f} ms, Grad-CAM, 1 image, decode + preprocess + encode included): "
          f"{overhead:.1f} ms")


if __name__ == "__main__":
    main()
