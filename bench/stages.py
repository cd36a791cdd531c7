"""Where one idle Grad-CAM request's time goes, stage by stage, inside a real server process.

    .venv/bin/python bench/stages.py [--png] [--rounds 60]

Starts a server (this file with --serve: create_app under uvicorn, as `python -m service` runs it) whose call
path is wrapped with timestamps, sends one request at a time with 50 ms of idle between them, and prints the
median time of each stage and of each gap between stages. Timestamps come from CLOCK_MONOTONIC
(time.perf_counter), which client and server share on Linux. The wrappers cost a few microseconds each;
bench/service.py gives the unwrapped latency.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARKS: list[tuple[str, float]] = []


def mark(label: str) -> None:
    MARKS.append((label, time.perf_counter()))


def timed(owner, name: str, label: str) -> None:
    """Wrap owner.name (a function or method, sync or async) with `label>` / `label<` marks."""
    original = getattr(owner, name)
    if hasattr(original, "__code__") and original.__code__.co_flags & 0x80:  # a coroutine function
        async def wrapper(*args, **kwargs):
            mark(label + ">")
            try:
                return await original(*args, **kwargs)
            finally:
                mark(label + "<")
    else:
        def wrapper(*args, **kwargs):
            mark(label + ">")
            try:
                return original(*args, **kwargs)
            finally:
                mark(label + "<")
    setattr(owner, name, functools.wraps(original)(wrapper))


def serve(port: int) -> None:
    import uvicorn

    from service import imaging, runtime
    from service.api import body, explain, responses
    from service.app import create_app
    from service.settings import Settings
    from service.zoo.preprocess import Preprocessor

    timed(body, "parse_multipart", "multipart")
    timed(imaging, "decode_image", "decode")
    timed(Preprocessor, "batch", "preprocess")
    timed(runtime.Runtime, "submit", "submit")
    timed(runtime.Runtime, "_run_batch", "compute")
    timed(runtime, "encode_result", "encode")  # runtime calls it by its own name
    timed(responses.FastJSONResponse, "render", "json")
    settings = Settings(models=["efficientnet_lite0"], cache_bytes=0, log_level="warning", port=port)
    app = create_app(settings)

    async def traced(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/stages":
            data = json.dumps(MARKS).encode()
            MARKS.clear()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": data})
            return
        if scope["type"] != "http":
            return await app(scope, receive, send)
        mark("asgi>")

        async def observed(message):
            if message["type"] == "http.response.body" and not message.get("more_body"):
                mark("send>")
            await send(message)

        await app(scope, receive, observed)

    uvicorn.run(traced, host="127.0.0.1", port=port, log_level="warning")
    del explain  # imported so that its module's names are the wrapped ones


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--png", action="store_true", help="upload PNG (default JPEG, quality 95)")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    import httpx

    from bench.service import free_port, jpeg_bytes, photos, png_bytes, post, start_server

    port = free_port()
    proc = start_server(port, [sys.executable, __file__, "--serve", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        image = photos()[0]
        blob = png_bytes(image) if args.png else jpeg_bytes(image)
        spans: dict[str, list[float]] = {}
        with httpx.Client(timeout=60) as client:
            for i in range(args.rounds + 5):
                time.sleep(0.05)
                client.get(f"{base}/stages")
                start = time.perf_counter()
                post(client, base, "gradcam", blob, {})
                end = time.perf_counter()
                marks = [("client sends", start)] + [tuple(m) for m in client.get(f"{base}/stages").json()]
                marks.append(("client has the body", end))
                if i < 5:
                    continue  # warm-up
                for (a, ta), (b, tb) in itertools.pairwise(marks):
                    name = a[:-1] if a.endswith(">") and b == a[:-1] + "<" else f"{a} -> {b}"
                    spans.setdefault(name, []).append((tb - ta) * 1000)
                spans.setdefault("total", []).append((end - start) * 1000)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"one Grad-CAM request, chelsea 451x300 as {'PNG' if args.png else 'JPEG'}, "
          f"{args.rounds} idle rounds; "
          "medians in ms (a label> b< pair is a stage, anything else the gap between two marks)\n")
    print("| span | ms |\n|---|---:|")
    for name, values in spans.items():
        print(f"| {name} | {statistics.median(values):.2f} |")
    around = statistics.median(spans["total"]) - statistics.median(spans["compute"])
    print(f"\ntotal - compute (medians): {around:.2f} ms")


if __name__ == "__main__":
    main()
