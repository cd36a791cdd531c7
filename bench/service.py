"""Service throughput and latency under 1, 4 and 16 concurrent clients, against the peer library doing the
same work in-process one image at a time (pytorch-grad-cam for Grad-CAM, Captum for IG), as ratios.

    .venv/bin/python bench/service.py [--quick]
    python bench/service.py --device cuda --ig-steps 50 --scale 10    # on a GPU machine


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
import sys
import threading
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
from service.zoo import ModelRegistry, resolve_device  # noqa: E402


def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(img).convert("RGB") for img in (data.chelsea(), data.coffee(), data.astronaut(),
                                                            data.rocket())]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, command: list[str] | None = None, device: str = "auto", worker: str = "auto",
                 model: str = "efficientnet_lite0") -> subprocess.Popen:
    """`python -m service` (or `command`) on `port` serving only `model`, once /readyz says ready."""
    # The result cache off: repeated photos must cost real passes, or the service would be flattered.
    env = {**os.environ, "SALIENCY_MODELS": f'["{model}"]', "SALIENCY_DEFAULT_MODEL": model,
           "SALIENCY_LOG_LEVEL": "warning",
           "SALIENCY_CACHE_BYTES": "0", "SALIENCY_DEVICE": device, "SALIENCY_WORKER": worker}
    command = command or [sys.executable, "-m", "service", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while time.perf_counter() - started < 240:  # a GPU server warms every batch size first (gpu_warmup)
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                print(f"server ready in {time.perf_counter() - started:.1f} s", flush=True)
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def post(client: httpx.Client, base: str, method: str, blob: bytes, params: dict) -> httpx.Response:
    kind = "jpeg" if blob[:2] == b"\xff\xd8" else "png"
    r = client.post(f"{base}/v1/explain/{method}", data={k: str(v) for k, v in params.items()},
                    files=[("image", (f"x.{kind}", blob, f"image/{kind}"))])
    r.raise_for_status()
    return r


def worker_totals(base: str, method: str) -> tuple[float, float, float]:
    """(batches, images, compute seconds) the server has run for `method` so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"saliency_batch_size_count": 0.0, "saliency_batch_size_sum": 0.0,
              "saliency_compute_seconds_sum": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("method") == method:
                totals[sample.name] += sample.value
    return tuple(totals.values())


def load(base: str, method: str, blobs: list[bytes], params: dict, clients: int, requests: int):
    """Latencies (s) of `requests` calls from `clients` concurrent clients, and the wall time."""
    local = threading.local()

    def one(i: int) -> float:
        if not hasattr(local, "client"):  # one keep-alive connection per client thread, as real clients do
            local.client = httpx.Client(timeout=600)
        t = time.perf_counter()
        post(local.client, base, method, blobs[i % len(blobs)], params)
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    return latencies, time.perf_counter() - start


def idle_overhead(base: str, model, image: Image.Image, rounds: int) -> dict[str, dict[str, float]]:
    """One Grad-CAM request at a time on an idle server, per upload format, interleaved with the same
    explanation in this process so that both see the same machine. Medians in ms. (explain returns maps
    copied to the CPU, so its time includes the device's work.)"""
    x = model.preprocess(image).unsqueeze(0).to(model.device)
    uploads = {"png": png_bytes(image), "jpeg": jpeg_bytes(image)}
    latency = {kind: [] for kind in uploads}
    server_compute = {kind: [] for kind in uploads}
    in_process = []
    params = METHODS["gradcam"].Params()
    explain(model, METHODS["gradcam"], x, [None], params)
    with httpx.Client(timeout=600) as client:
        for blob in uploads.values():
            post(client, base, "gradcam", blob, {})  # opens the connection
        for _ in range(rounds):
            for kind, blob in uploads.items():
                time.sleep(0.05)  # idle: the previous request's threads have gone quiet
                t = time.perf_counter()
                r = post(client, base, "gradcam", blob, {})
                latency[kind].append(time.perf_counter() - t)
                server_compute[kind].append(r.json()["results"][0]["timing_ms"]["compute"] / 1000)
            # The same idle pause before the in-process call, and no warm-up call just before it: both sides
            # start one explanation from the same idle state (a warm-up right before flattered this side).
            time.sleep(0.05)
            t = time.perf_counter()
            explain(model, METHODS["gradcam"], x, [None], params)
            in_process.append(time.perf_counter() - t)
    compute = statistics.median(in_process)
    return {kind: {"p50": statistics.median(latency[kind]) * 1000, "in_process": compute * 1000,
                   "server_compute": statistics.median(server_compute[kind]) * 1000,
                   "overhead": (statistics.median(latency[kind]) - compute) * 1000,
                   # The same request's latency minus its own compute: immune to the two sides drifting apart.
                   "around_compute": statistics.median(
                       [lat - own
                        for lat, own in zip(latency[kind], server_compute[kind], strict=False)]) * 1000}
            for kind in uploads}


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
    ig.attribute(xs[0], baselines=black, target=0, n_steps=n_steps)  # warm-up (cuDNN picks its kernels)
    t = time.perf_counter()
    for _ in range(repeats):
        for x in xs:
            with torch.no_grad():
                target = int(model.module(x).argmax())
            ig.attribute(x, baselines=black, target=target, n_steps=n_steps, return_convergence_delta=True)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
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
    parser.add_argument("--ig-steps", type=int, default=16,
                        help="IG n_steps for both sides (CPU: keep it small)")
    parser.add_argument("--overhead-only", action="store_true", help="only the idle-server overhead")
    parser.add_argument("--device", default="auto",
                        help="the server's and the peers' device (auto: CUDA if any)")
    parser.add_argument("--scale", type=int, default=None,
                        help="requests per client and timing rounds (default 3, --quick 1; a GPU wants ~10)")
    parser.add_argument("--workers", default="auto",
                        help="comma-separated SALIENCY_WORKER values: one server per value (thread, process, "
                        "auto), each measured against the same peer figures")
    parser.add_argument("--methods", default="gradcam,integrated-gradients",
                        help="comma-separated methods to load")
    parser.add_argument("--clients", default="1,4,16",
                        help="comma-separated client counts, run in this order on one server (repeat a count "
                        "to see whether a tail is first-time work)")
    args = parser.parse_args()
    torch.manual_seed(0)
    scale = args.scale or (1 if args.quick else 3)
    device = resolve_device(args.device)
    registry = ModelRegistry.from_dir(ROOT / "models", device, only={"efficientnet_lite0"})
    model = registry.models["efficientnet_lite0"]
    # The peers get the model as its users hold it: no BatchNorm folding (the service folds,
    # service/zoo/fold.py).
    as_built = ModelRegistry.from_dir(ROOT / "models", device, only={"efficientnet_lite0"},
                                      fold_norms=False).models["efficientnet_lite0"]
    images = photos()
    blobs = [png_bytes(im) for im in images]
    xs = [model.preprocess(im).unsqueeze(0).to(device) for im in images]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; python {platform.python_version()}; "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    cases = {"gradcam": ({}, lambda: peer_gradcam(as_built, xs, scale), "pytorch-grad-cam GradCAM"),
             "integrated-gradients": ({"n_steps": args.ig_steps},
                                      lambda: peer_ig(as_built, xs, args.ig_steps,
                                                      1 if device.type == "cpu" else scale),
                                      "Captum IntegratedGradients")}
    cases = {name: case for name, case in cases.items() if name in args.methods.split(",")}
    if args.overhead_only:
        cases = {}
    peer_s = {name: fn() for name, (_, fn, _) in cases.items()}

    rows, overheads = [], {}
    for worker in args.workers.split(","):
        port = free_port()
        proc = start_server(port, device=str(device), worker=worker)
        base = f"http://127.0.0.1:{port}"
        try:
            load(base, "gradcam", blobs, {}, 1, 4)  # warm-up
            for name, (params, _, peer_name) in cases.items():
                per_client = (8 if name == "gradcam" else 2) * scale
                for clients in map(int, args.clients.split(",")):
                    n = max(per_client * min(clients, 4), clients)
                    before = worker_totals(base, name)
                    latencies, wall = load(base, name, blobs, params, clients, n)
                    after = worker_totals(base, name)
                    batches, imgs, busy_s = (b - a for a, b in zip(before, after, strict=False))
                    throughput = n / wall
                    p50 = statistics.median(latencies) * 1000
                    p95 = float(np.percentile(latencies, 95)) * 1000
                    slowest = sorted(latencies)[-5:]
                    print(f"{worker} {name} {clients} clients: "
                          f"slowest {[round(t * 1000) for t in slowest]} ms, "
                          f"mean {statistics.mean(latencies) * 1000:.0f} ms", flush=True)
                    # Where the limit is: a worker busy ~100 % of the wall is bound by its passes (GIL
                    # contention shows as longer passes); one that idles waits on the host side.
                    worker_side = (imgs / max(batches, 1), 1000 * busy_s / max(batches, 1),
                                   100 * busy_s / wall)
                    rows.append((worker, name, clients, n, throughput, p50, p95, peer_name, worker_side))
            overheads[worker] = idle_overhead(base, model, images[0], 15 * scale)
        finally:
            proc.terminate()
            proc.wait(30)

    # The peer again, after the servers: this VM's speed drifts over minutes, and a peer timed in a slow
    # stretch would flatter the service. Each ratio takes the faster of the two peer runs.
    peer_after = {name: fn() for name, (_, fn, _) in cases.items()}
    for name in cases:
        print(f"peer {name}: {1 / peer_s[name]:.2f} img/s before the servers, "
              f"{1 / peer_after[name]:.2f} after; the ratios use the faster")
        peer_s[name] = min(peer_s[name], peer_after[name])
    print(f"\nIG n_steps = {args.ig_steps} on both sides; "
          "images: skimage chelsea, coffee, astronaut, rocket\n")
    print("The last three columns come from the server's /metrics over each row: images per batch, "
          "the worker's\ntime per batch (its pass, top-k and map resizing), and that time as a share of "
          "the row's wall time.\n")
    print("| worker | method | clients | requests | service img/s | p50 ms | p95 ms | peer in-process img/s "
          "| ratio | peer | images/batch | ms/batch | worker busy % |")
    print("|---|---|---|---|---|---|---|---|---|---|---:|---:|---:|")
    for worker, name, clients, n, tp, p50, p95, peer_name, (per_batch, batch_ms, busy) in rows:
        peer_tp = 1 / peer_s[name]
        ratio = tp / peer_tp
        print(f"| {worker} | {name} | {clients} | {n} | {tp:.2f} | {p50:.0f} | {p95:.0f} | {peer_tp:.2f} | "
              f"{ratio:.2f}x | {peer_name} | {per_batch:.1f} | {batch_ms:.1f} | {busy:.0f} |")
    print("\nService overhead: one Grad-CAM request (chelsea, 451x300, map as .npy at the original size) "
          "on an idle server;\noverhead = p50 latency - the same explanation in this process (engine.explain "
          "on the preprocessed tensor).\nDecoding, preprocessing, encoding and HTTP all count as overhead. "
          "The last column pairs each request's latency\nwith the compute the server reports for it "
          "(timing_ms.compute): the time spent around the model pass.\n")
    print("| worker | upload | p50 latency ms | in-process compute ms | overhead ms "
          "| server's own compute ms | p50 latency - own compute ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for worker, overhead in overheads.items():
        for kind, row in overhead.items():
            print(f"| {worker} | {kind} | {row['p50']:.1f} | {row['in_process']:.1f} "
                  f"| {row['overhead']:.1f} | {row['server_compute']:.1f} | {row['around_compute']:.1f} |")


if __name__ == "__main__":
    main()
