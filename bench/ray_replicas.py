"""Throughput of the Ray Serve engine with 1 and 2 CPU explainer replicas, and of the embedded engine.

    .venv/bin/python bench/ray_replicas.py [--requests 96] [--clients 16] [--method gradcam]

EfficientNet-Lite0 on the CPU, one image per request, all requests in flight from `--clients` threads.
Prints a Markdown table (images/s, p50/p95 latency) for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.settings import Settings  # noqa: E402
from tests.server import free_port, running_server  # noqa: E402

MODEL = "efficientnet_lite0"


def images(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def load(base: str, blobs: list[bytes], clients: int, method: str, params: dict) -> tuple[float, list[float]]:
    def one(blob: bytes) -> float:
        started = time.perf_counter()
        r = httpx.post(f"{base}/v1/explain/{method}", timeout=300, data={"size": "input", **params},
                       files=[("image", ("x.png", blob, "image/png"))])
        r.raise_for_status()
        return time.perf_counter() - started

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, blobs[: 2 * clients]))  # warm-up: every replica has run a batch
        started = time.perf_counter()
        latencies = list(pool.map(one, blobs))
    return len(blobs) / (time.perf_counter() - started), latencies


def row(name: str, result: tuple[float, list[float]]) -> str:
    rate, latencies = result
    p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))]
    return f"| {name} | {rate:.1f} | {statistics.median(latencies) * 1000:.0f} | {p95 * 1000:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--method", default="gradcam")
    args = parser.parse_args()
    params = {"n_samples": "8"} if args.method == "smoothgrad" else {}
    blobs = images(args.requests)
    settings = Settings(models=[MODEL], default_model=MODEL, cache_bytes=0, device="cpu")
    cores = os.cpu_count()
    rows = []

    with running_server(settings) as (base, _):
        rows.append(row(f"embedded (one worker, torch threads = {cores})", load(base, blobs, args.clients,
                                                                              args.method, params)))

    import ray
    from ray import serve

    from service.distributed.app import APP_NAME, build

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_maximum_startup_concurrency": 8})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    for replicas, threads in ((1, cores), (1, 1), (2, 1)):
        options = {MODEL: {"num_replicas": replicas, "ray_actor_options": {"num_cpus": cores / replicas}}}
        serve.run(build(settings, options, threads=threads), name=APP_NAME, route_prefix="/")
        while httpx.get(f"{base}/readyz", timeout=10).status_code != 200:
            time.sleep(0.5)
        rows.append(row(f"Ray Serve, {replicas} replica(s) x {threads} torch thread(s)",
                        load(base, blobs, args.clients, args.method, params)))
        serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()

    print(f"\n{args.method} on {MODEL}, CPU, {cores} cores, {args.requests} requests of one 224x224 image "
          f"from {args.clients} concurrent clients (after a warm-up)\n")
    print("| engine | images/s | p50 ms | p95 ms |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
