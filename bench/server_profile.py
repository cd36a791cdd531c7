"""Where a loaded server's time goes: py-spy samples the real server (and its engine processes) while clients
keep it busy, and this prints, per group of threads, how much of the time they were on a CPU and how much
they held the GIL, and the functions they were in.

    .venv/bin/python bench/server_profile.py [--device cuda] [--worker thread] [--clients 16] [--seconds 15]

The server is the default model's (`python -m service`), loaded with Grad-CAM requests on the four photos
(PNG, maps as .npy at the upload's size), as bench/service.py loads it; rounds at the client count run first,
so the profile is of the steady state, not of the first-time work per pass size. py-spy must be on PATH or
beside this Python (`pip install py-spy`); it reads the server's memory (process_vm_readv), which a container
may forbid. It samples without pausing the server unless --native asks for C/C++ frames too. The collapsed
stacks are written to --out for a flame graph (`flamegraph.pl` or speedscope).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

# bench/service.py's server and client helpers; loaded by path because its name is the service package's.
_spec = importlib.util.spec_from_file_location("bench_service",
                                               Path(__file__).resolve().parent / "service.py")
bench_service = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_service)

# py-spy's samples of threads on a CPU (idle ones, blocked on a lock, the GIL or a socket, are left out), then
# of the one thread holding the GIL (in each process: an engine process has a GIL of its own). A process whose
# threads hold the GIL near 1.00 in all is bound by its Python, not by its cores or its device.
RUNS = {"on a CPU": [], "holding the GIL": ["--gil"]}


def py_spy() -> str:
    """py-spy on PATH, beside this Python, or in the bin/ of a `pip install --target` directory on sys.path
    (how the GPU machine gets its wheels, bench/gpu.sh)."""
    places = [shutil.which("py-spy"), Path(sys.executable).with_name("py-spy"),
              *(Path(p) / "bin" / "py-spy" for p in sys.path if p)]
    for place in places:
        if place and Path(place).is_file():
            return str(place)
    raise SystemExit("py-spy not found: pip install py-spy")


def _name(frame: str) -> str:
    """`function (file:line)` -> `function (file)`; native frames keep their library."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.split(':')[0].rstrip(')')})" if where else function


def parse_collapsed(text: str, server_pid: int) -> dict[str, dict]:
    """Group py-spy's raw (collapsed) lines,
    `process P:"cmd";[process C:"cmd";]thread (tid): name;frame;...;frame count`, by process role and thread
    name: the thread ids, the samples, and their innermost frames (the innermost Python frame, and with
    --native the innermost named native frame too)."""
    groups: dict[str, dict] = defaultdict(lambda: {"tids": set(), "samples": 0, "frames": Counter()})
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        processes = 0  # --subprocesses: a child's lines name its parents first, then itself
        while processes < len(parts) and parts[processes].startswith("process "):
            processes += 1
        process, thread, frames = parts[processes - 1], parts[processes], parts[processes + 1:]
        pid = int(process.split()[1].split(":")[0])
        role = "server" if pid == server_pid else "engine process"
        tid, _, thread_name = thread.removeprefix("thread (").partition("): ")
        thread_name = re.sub(r"[_-]\d+$", "", thread_name) or "unnamed"  # encode_0, encode_1, ...: one group
        group = groups[f"{role}: {thread_name}"]
        group["tids"].add(tid.rstrip(")"))
        group["samples"] += int(count)
        python = [f for f in frames if ".py:" in f]
        native = [f for f in frames if ".py:" not in f and not f.startswith("0x")]
        leaf = _name(python[-1]) if python else "(no Python frame)"
        if native and frames.index(native[-1]) > (frames.index(python[-1]) if python else -1):
            leaf += f" > {_name(native[-1])}"
        group["frames"][leaf] += int(count)
    return groups


def summarise(runs: dict[str, dict[str, dict]], thread_samples: float, top: int) -> str:
    """A markdown table: per group of threads, how many threads' worth of time each run saw them in (1.00 =
    one thread all the time), and their innermost frames in each run. `thread_samples`: the samples one
    thread gives over a run. Groups under 0.5 % of one thread in every run are left out."""
    names = list(runs)
    head = " | ".join(f"{run} (threads' worth)" for run in names)
    frames = " | ".join(f"{run}: innermost frames" for run in names)
    lines = [f"| threads | n | {head} | {frames} |",
             "|---|---:|" + "---:|" * len(names) + "---|" * len(names)]
    groups = sorted({g for run in runs.values() for g in run},
                    key=lambda g: -sum(run[g]["samples"] for run in runs.values() if g in run))
    for group in groups:
        seen = [runs[run].get(group) for run in names]
        if all(g is None or g["samples"] < 0.005 * thread_samples for g in seen):
            continue
        threads = max(len(g["tids"]) for g in seen if g)
        shares = " | ".join(f"{(g['samples'] if g else 0) / thread_samples:.2f}" for g in seen)
        tops = " | ".join(", ".join(f"{f} {100 * c / g['samples']:.0f}%"
                                    for f, c in g["frames"].most_common(top))
                          if g else "" for g in seen)
        lines.append(f"| {group} | {threads} | {shares} | {tops} |")
    totals = " | ".join(f"**{sum(g['samples'] for g in runs[run].values()) / thread_samples:.2f}**"
                        for run in names)
    lines.append(f"| **all** | | {totals} |" + " |" * len(names))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--worker", default="thread", help="SALIENCY_WORKER (thread, process)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=15, help="how long py-spy samples")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--top", type=int, default=6, help="leaf frames listed per thread")
    parser.add_argument("--out", default="gpu-logs", help="where the collapsed stacks go")
    parser.add_argument("--native", action="store_true",
                        help="native frames too (pauses the server per sample)")
    args = parser.parse_args()

    blobs = [bench_service.png_bytes(im) for im in bench_service.photos()]
    port = bench_service.free_port()
    proc = bench_service.start_server(port, device=args.device, worker=args.worker)
    base = f"http://127.0.0.1:{port}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spies: dict[str, subprocess.CompletedProcess] = {}
    stacks = {run: out / f"profile_{args.worker}_{args.clients}_{run.replace(' ', '_')}.txt" for run in RUNS}
    try:
        for _ in range(2):  # every pass size the clients make, seen before sampling starts
            bench_service.load(base, "gradcam", blobs, {}, args.clients, 8 * args.clients)
        stop = threading.Event()

        def keep_busy():
            while not stop.is_set():
                bench_service.load(base, "gradcam", blobs, {}, args.clients, 2 * args.clients)

        client = threading.Thread(target=keep_busy, daemon=True)
        client.start()
        before = bench_service.worker_totals(base, "gradcam")
        started = time.perf_counter()
        for run, flags in RUNS.items():
            command = [py_spy(), "record", "--pid", str(proc.pid), "--duration", str(args.seconds), "--rate",
                       str(args.rate), "--format", "raw", "--threads", "--subprocesses", *flags,
                       "--output", str(stacks[run])]
            if args.native:  # native frames need the process paused at each sample: it runs slower meanwhile
                command.insert(2, "--native")
            else:
                command.insert(2, "--nonblocking")
            spies[run] = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = bench_service.worker_totals(base, "gradcam")
        stop.set()
        client.join()
    finally:
        proc.terminate()
        proc.wait(30)
    for run, spy in spies.items():
        if spy.returncode != 0:
            raise SystemExit(f"py-spy ({run}) failed ({spy.returncode}): {spy.stderr.strip()[-600:]}")
    batches, images, busy_s = (b - a for a, b in zip(before, after, strict=False))
    print(f"{args.worker} worker, {args.clients} clients, over the {wall:.0f} s of sampling: "
          f"{images / wall:.1f} img/s, {images / max(batches, 1):.1f} images per batch, "
          f"{1000 * busy_s / max(batches, 1):.1f} ms per batch, worker busy {100 * busy_s / wall:.0f} %")
    print(f"{len(RUNS)} py-spy runs of {args.seconds} s at {args.rate} samples/s, one after the other; "
          f"collapsed stacks in {out}/\n")
    runs = {run: parse_collapsed(path.read_text(), proc.pid) for run, path in stacks.items()}
    print(summarise(runs, args.seconds * args.rate, args.top))


if __name__ == "__main__":
    main()
