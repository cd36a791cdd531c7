"""Per-thread CPU time and page faults of a server under load, and what bulk-lane work leaves behind (CPU).

    .venv/bin/python bench/server_threads.py            # both parts
    .venv/bin/python bench/server_threads.py --part load
    .venv/bin/python bench/server_threads.py --part bulk

load: `python -m service` on the default model, three rounds of 16 clients posting the four skimage photos as
PNG; per round the throughput and, from /proc, each busy thread's page faults and user/system CPU per image.
The two busiest threads are the pass's: the worker and its OpenMP helper.

bulk: the server with bulk_cost=10, so that one IG request of 16 steps runs on the bulk lane. The server's own
compute for idle Grad-CAM requests (timing_ms.compute, medians of 30), and its thread count, before and after
that request (service/host.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import httpx

_spec = importlib.util.spec_from_file_location("bench_service",
                                               Path(__file__).resolve().parent / "service.py")
bench_service = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_service)

TICKS = os.sysconf("SC_CLK_TCK")


def thread_stats(pid: int) -> dict[str, tuple[int, float, float]]:
    """Per thread id: (minor faults, user s, system s)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[tid] = (int(fields[7]), int(fields[11]) / TICKS, int(fields[12]) / TICKS)
    return out


def load(blobs: list[bytes], rounds: int, requests: int) -> None:
    port = bench_service.free_port()
    proc = bench_service.start_server(port, device="cpu")
    base = f"http://127.0.0.1:{port}"
    try:
        bench_service.load(base, "gradcam", blobs, {}, 1, 4)  # as bench/service.py warms up
        for r in range(rounds):
            before = thread_stats(proc.pid)
            _, wall = bench_service.load(base, "gradcam", blobs, {}, 16, requests)
            after = thread_stats(proc.pid)
            print(f"\nround {r + 1}: 16 clients, {requests / wall:.1f} img/s")
            print("| thread | faults/img | user ms/img | sys ms/img |\n|---|---:|---:|---:|")
            rows = []
            for tid, (faults, user, system) in after.items():
                f0, u0, s0 = before.get(tid, (0, 0.0, 0.0))
                rows.append((tid, (faults - f0) / requests, (user - u0) / requests * 1000,
                             (system - s0) / requests * 1000))
            for tid, faults, user, system in sorted(rows, key=lambda row: -(row[2] + row[3]))[:4]:
                print(f"| {tid} | {faults:.0f} | {user:.1f} | {system:.1f} |")
    finally:
        proc.terminate()
        proc.wait(30)


def bulk(blob: bytes, n: int) -> None:
    port = bench_service.free_port()
    os.environ["SALIENCY_BULK_COST"] = "10"
    proc = bench_service.start_server(port, device="cpu")
    base = f"http://127.0.0.1:{port}"

    def idle_compute(client: httpx.Client) -> float:
        times = []
        for _ in range(n):
            time.sleep(0.05)
            r = bench_service.post(client, base, "gradcam", blob, {})
            times.append(r.json()["results"][0]["timing_ms"]["compute"])
        return statistics.median(times)

    try:
        with httpx.Client(timeout=600) as client:
            for _ in range(3):
                bench_service.post(client, base, "gradcam", blob, {})
            before, threads_before = idle_compute(client), len(os.listdir(f"/proc/{proc.pid}/task"))
            bench_service.post(client, base, "integrated-gradients", blob, {"n_steps": 16})  # the bulk lane
            time.sleep(1)
            after, threads_after = idle_compute(client), len(os.listdir(f"/proc/{proc.pid}/task"))
        print(f"\nidle Grad-CAM, the server's own compute: {before:.1f} ms before a bulk-lane request, "
              f"{after:.1f} ms after ({after / before:.2f}x); server threads {threads_before} before, "
              f"{threads_after} after")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["load", "bulk", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="requests per load round")
    args = parser.parse_args()
    blobs = [bench_service.png_bytes(image) for image in bench_service.photos()]
    if args.part in ("load", "both"):
        load(blobs, args.rounds, args.requests)
    if args.part in ("bulk", "both"):
        bulk(blobs[0], 30)


if __name__ == "__main__":
    main()
