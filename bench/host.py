"""The host side's ceiling: how many requests per second the server takes when the model pass costs next to
nothing, and how much CPU each request costs it, split between the event loop and the other threads.

    .venv/bin/python bench/host.py [--clients 16] [--requests 320] [--workers thread,process] [--upload png]

On a GPU a batched Grad-CAM pass costs a few milliseconds, so the service's throughput at 16 clients is
bounded by its host work: HTTP, multipart, decoding, resizing, encoding the maps, JSON. This isolates that
work on any machine. The server runs the tiny test CNN (64 x 64 input; its pass is a small fraction of a
request's CPU) on the four photos at their own sizes, and returns maps as .npy at the upload's size, as
bench/service.py asks. The event loop is one thread, so its CPU ms per request bounds what one server process
can take whatever the core count: 1000 / that figure requests per second. CPU times come from /proc (Linux
only).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import httpx

# bench/service.py's server and client helpers; loaded by path because its name is the service package's.
_spec = importlib.util.spec_from_file_location("bench_service",
                                               Path(__file__).resolve().parent / "service.py")
bench_service = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_service)
free_port, jpeg_bytes, load = bench_service.free_port, bench_service.jpeg_bytes, bench_service.load
photos, png_bytes, start_server = bench_service.photos, bench_service.png_bytes, bench_service.start_server

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def thread_cpu_ms(pid: int) -> dict[int, float]:
    """utime + stime of every thread of `pid`, in ms."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) * TICK_MS
    return out


def children_cpu_ms(pid: int) -> float:
    """CPU of the engine processes (SALIENCY_WORKER=process), which are children of the server."""
    total = 0.0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += sum(thread_cpu_ms(int(child)).values())
    return total


def measure(base: str, pid: int, blobs: list[bytes], clients: int, requests: int) -> dict[str, float]:
    load(base, "gradcam", blobs, {}, clients, 2 * clients)  # warm-up: connections, threads, allocator
    before, before_children = thread_cpu_ms(pid), children_cpu_ms(pid)
    latencies, wall = load(base, "gradcam", blobs, {}, clients, requests)
    after, after_children = thread_cpu_ms(pid), children_cpu_ms(pid)
    loop = after.get(pid, 0.0) - before.get(pid, 0.0)  # uvicorn runs the event loop in the main thread
    total = sum(after.values()) - sum(before.get(tid, 0.0) for tid in after)
    return {"rps": requests / wall, "loop_ms": loop / requests, "other_ms": (total - loop) / requests,
            "children_ms": (after_children - before_children) / requests,
            "p50": sorted(latencies)[len(latencies) // 2] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--workers", default="thread")
    parser.add_argument("--upload", choices=("png", "jpeg"), default="png")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per worker kind")
    args = parser.parse_args()
    encode = png_bytes if args.upload == "png" else jpeg_bytes
    blobs = [encode(image) for image in photos()]
    print(f"{os.cpu_count()} cores; tiny_cnn, Grad-CAM, {args.upload} uploads of the four photos, "
          f"maps as .npy at the upload's size; {args.clients} clients, {args.requests} requests per row\n")
    print("| worker | requests/s | p50 ms | event loop CPU ms/request | other server threads ms/request | "
          "engine processes ms/request | loop-bound ceiling requests/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for worker in args.workers.split(","):
        port = free_port()
        proc = start_server(port, device="cpu", worker=worker, model="tiny_cnn")
        try:
            base = f"http://127.0.0.1:{port}"
            httpx.get(f"{base}/readyz")
            for _ in range(args.repeats):
                row = measure(base, proc.pid, blobs, args.clients, args.requests)
                print(f"| {worker} | {row['rps']:.1f} | {row['p50']:.0f} | {row['loop_ms']:.2f} | "
                      f"{row['other_ms']:.2f} | {row['children_ms']:.2f} | {1000 / row['loop_ms']:.0f} |",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
