#!/usr/bin/env python
"""D-RISE (service/detection/drise.py) against Microsoft's vision-explanation-methods (`DRISE_saliency`):
time and peak memory per image, and each map's correlation with a high-N reference.

    .venv/bin/python -m pip install --no-deps vision-explanation-methods==0.1.1   # the peer (see below)
    .venv/bin/python bench/drise.py                         # planted and MTCNN detectors, N=1000, s=16
    .venv/bin/python bench/drise.py --detectors planted --repeats 5   # the method's own cost, 5 rounds
    .venv/bin/python bench/drise.py --detectors frcnn --n 200         # a dense CNN detector, time only
    .venv/bin/python bench/drise.py --detectors planted --n 500 --ref-n 2000 --peer-ref-n 0

The peer installs with --no-deps: its `explanations/drise.py` imports only torch, torchvision, PIL, pandas
and tqdm, all here (its other requirements, ml-wrappers and matplotlib, serve its `DRISE_runner.py`, not
imported). Its torch requirement is unpinned, so nothing else moves.

The same work on both sides, read from the peer's source (0.1.1):
- one target detection, the detector's own on the clean image; N masks of an s x s grid with p = 0.5 (the
  peer draws `torch.randint(0, 2)`: p is fixed at 0.5), one detector forward per masked image;
- the weight of a mask: max over the masked image's detections of IoU x cosine of the class vectors x
  objectness (the peer multiplies the target's objectness in too, a constant per target: no change once
  min-maxed);
- the map: sum_i (w_i - mean w) M_i, then min-max (the peer's `saliency_fusion(normalize=True)`; ours, see
  service/detection/drise.py).
What differs, and stays (it is each implementation's own):
- masks: the peer resizes the grid to (H + pad, W + pad), pad = int(max(H/s, W/s)), with nearest-neighbour
  interpolation (square blocks) and crops with torchvision's RandomCrop from the global generator; ours
  follow RISE (bilinear to (s + 1) x cell, seeded per mask). So the two converge to slightly different maps:
  the table's "reference" rows show how far apart their high-N maps are.
- batching: the peer calls the detector once per mask (batch of 1) and keeps every mask (3, H, W) and its
  weighted copy until the end (memory grows with N: N x 3 x H x W floats); ours sends `--chunk` masked
  images per call and keeps running sums only.

Detectors (the same callable behind both: the peer's `GeneralObjectDetectionModelWrapper.predict` wraps the
service's `DetectFn`):
- planted: one fixed box whose score is the mean brightness of its own region relative to the clean image's
  (vectorised, microseconds a batch): what each implementation itself costs around a detector;
- mtcnn: the MTCNN face detector with its real weights (facenet-pytorch's wheel, the service's card
  `models/mtcnn.toml`) on the astronaut photo's face: a real detector's forwards, which dominate on a CPU.
  A cascade: what a forward costs depends on how many candidates survive its first stages, so on what the
  masks leave of the face. The peer's blocky masks leave less of it (fewer detections), so its forwards
  are cheaper and its weights mostly zero: compare the detector's and the rest's CPU time apart, and the
  maps' correlations.
- frcnn: torchvision's fasterrcnn_mobilenet_v3_large_320_fpn with seeded random weights, every box kept:
  a dense CNN whose cost does not depend on the masks, for timing only (random weights: its maps mean
  nothing and are not compared). What batching buys a CNN detector on this CPU.

Each measured call runs in its own subprocess (fresh peak RSS; --threads intra-op threads, 1 by default: on
a machine shared with other jobs a second OpenMP thread mostly waits, see docs/benchmarks.md "Per-map
metrics"); the time is wall clock and process CPU time of the D-RISE call alone (the detector built and the
target found before the clock starts), and apart, the CPU time inside the detector's calls; with --repeats
the timed runs at N take turns round after round and the table gives their medians. Correlation: Pearson
over the pixels of the displayed maps against a reference map of --ref-n masks computed by ours with another
seed (so ours at N shares no mask with it), and against the peer's own at --peer-ref-n masks where given.
"raw sum": ours' sum_i w_i M_i (the paper's formula, not centred) against the reference's, which shows what
the centring buys at a given N.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.detection.base import Detections  # noqa: E402
from service.detection.drise import DriseSettings, drise  # noqa: E402

PHOTO = ROOT / "service" / "evidence" / "photos" / "astronaut.jpg"
# MTCNN at 160 px: its forwards are the run's cost (the 5000-mask reference is thousands of them)
SIDES = {"planted": 224, "mtcnn": 160, "frcnn": 224}


def photo(side: int) -> torch.Tensor:
    im = Image.open(PHOTO).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0


class Planted:
    """One box, over the astronaut's face region at 224 px, scored by its region's brightness relative to
    the clean image's (clamped to [0, 1])."""

    def __init__(self, image: torch.Tensor):
        h, w = image.shape[-2:]
        self.region = (int(0.15 * h), int(0.45 * h), int(0.35 * w), int(0.6 * w))  # y1, y2, x1, x2
        y1, y2, x1, x2 = self.region
        self.box = torch.tensor([[float(x1), float(y1), float(x2), float(y2)]])
        self.clean = float(image[:, y1:y2, x1:x2].mean())

    def __call__(self, images: torch.Tensor) -> list[Detections]:
        y1, y2, x1, x2 = self.region
        scores = (images[:, :, y1:y2, x1:x2].mean((1, 2, 3)) / self.clean).clamp(0, 1)
        return [Detections(self.box.clone(), torch.zeros(1, dtype=torch.long), s[None]) for s in scores]


class RandomFasterRCNN:
    """torchvision's fasterrcnn_mobilenet_v3_large_320_fpn with seeded random weights, every box kept (score
    threshold 0): a dense CNN detector whose cost does not depend on what the masks leave (fixed proposals),
    for timing only (its detections mean nothing, so its maps are not compared)."""

    num_classes = 91

    def __init__(self, device: torch.device) -> None:
        import torchvision

        torch.manual_seed(0)
        self.model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=self.num_classes, box_score_thresh=0.0)
        self.model = self.model.eval().to(device)

    def __call__(self, images: torch.Tensor) -> list[Detections]:
        with torch.no_grad():
            out = self.model(list(images))
        return [Detections(o["boxes"], o["labels"], o["scores"]) for o in out]


class Timed:
    """The detector with a clock: what the forwards cost, apart from what D-RISE costs around them (on a GPU
    the clock waits for the device, so its wall time is the forwards' own)."""

    def __init__(self, detect, device: torch.device):
        self.detect, self.wall, self.cpu, self.images = detect, 0.0, 0.0, 0
        self.device = device

    def __call__(self, images: torch.Tensor) -> list[Detections]:
        sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        out = self.detect(images)
        sync(self.device)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.images += images.shape[0]
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def detector(name: str, image: torch.Tensor) -> tuple[Any, int]:
    """(detect, number of classes), on the image's device."""
    if name == "planted":
        return Planted(image), 1
    if name == "frcnn":
        return RandomFasterRCNN(image.device), RandomFasterRCNN.num_classes
    from service.detection.mtcnn import MtcnnDetector

    return MtcnnDetector.from_package(image.device), 1


def peer_map(detect, num_classes: int, image: torch.Tensor, target: Detections, n: int, grid: int,
             seed: int) -> torch.Tensor:
    from vision_explanation_methods.explanations import drise as peer
    from vision_explanation_methods.explanations.common import (
        DetectionRecord,
        GeneralObjectDetectionModelWrapper,
    )

    def record(d: Detections) -> DetectionRecord:
        # the class vectors ours uses (one-hot labels: one class gives cosine 1); objectness is the score
        return DetectionRecord(bounding_boxes=d.boxes, objectness_scores=d.scores,
                               class_scores=d.class_vectors(num_classes))

    class Wrapper(GeneralObjectDetectionModelWrapper):
        def predict(self, x: torch.Tensor) -> list[DetectionRecord]:
            return [record(d) for d in detect(x)]

    torch.manual_seed(seed)  # the peer draws its masks and crops from torch's global generator
    out = peer.DRISE_saliency(Wrapper(), image[None], [record(target)], n, (grid, grid),
                              device=str(image.device))
    return out[0][0]["detection"][0]  # (3, H, W), the channels equal


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    image = photo(SIDES[spec["detector"]]).to(device)
    inner, num_classes = detector(spec["detector"], image)
    with torch.no_grad():
        found = inner(image[None])[0]
    if len(found) == 0:
        raise SystemExit(f"{spec['detector']}: no detection on the clean image")
    best = int(found.scores.argmax())
    target = Detections(found.boxes[best:best + 1], found.labels[best:best + 1], found.scores[best:best + 1])
    detect = Timed(inner, device)
    if spec["impl"] == "peer":  # its import (pandas) before the clock
        import vision_explanation_methods.explanations.drise  # noqa: F401
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if spec["impl"] == "ours":
            settings = DriseSettings(spec["n"], spec["grid"], 0.5, spec["seed"])
            maps, info = drise(detect, image, target, num_classes, settings, chunk=spec["chunk"])
            heat, raw = maps[0], info["raw"][0]
        else:
            heat = peer_map(detect, num_classes, image, target, spec["n"], spec["grid"], spec["seed"])
            raw = torch.full_like(heat, float("nan"))
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    torch.save(torch.stack([heat.float(), raw.float()]).cpu(), spec["out"])
    return {"wall": wall, "cpu": cpu, "detector_cpu": detect.cpu, "detector_wall": detect.wall,
            "forwards": detect.images, "peak_mb": (after - before) / 1024, "gpu_peak_mb": gpu_mb,
            "box": target.boxes[0].tolist(),
            "score": float(target.scores[0])}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"worker {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--detectors", default="planted,mtcnn", help="planted, mtcnn, frcnn (timing only)")
    ap.add_argument("--n", type=int, default=1000, help="masks per image, both sides (the service's default)")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--chunks", default=None,
                    help="ours: masked images per detector call, the first the one the ratio is taken at "
                         "(default: the service's pass budget on a CPU, cpu_pass_batch, then 1; 64,1 on "
                         "a GPU)")
    ap.add_argument("--ref-n", type=int, default=5000, help="masks of the reference (ours, another seed)")
    ap.add_argument("--curve", default="250,500,2000", help="ours at these N too (the first chunk): how the "
                                                            "correlation grows with N ('' for none)")
    ap.add_argument("--peer-ref-n", type=int, default=4000,
                    help="masks of the peer's own reference, planted detector only (0: none); its memory "
                         "is ~N x 3 x H x W floats")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: the detector, the masks and the sums on it "
                                                    "(both sides); on a GPU compare the wall times")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the timed runs at N (medians)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.chunks is None:
        from service.settings import Settings

        args.chunks = "64,1" if args.device.startswith("cuda") else f"{Settings().cpu_pass_batch},1"
    chunks = [int(c) for c in args.chunks.split(",")]
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, torch "
          f"{torch.__version__}, threads {args.threads}, N={args.n}, grid {args.grid}, device {where}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.detectors.split(","):
            compare = name != "frcnn"  # random weights: time only
            rows = measure_all(name, args, chunks, compare, Path(tmp))
            print_table(rows, chunks, compare)


Row = tuple[str, dict[str, Any], torch.Tensor]


def measure_all(name: str, args: argparse.Namespace, chunks: list[int], compare: bool,
                tmp: Path) -> list[Row]:
    base = {"detector": name, "grid": args.grid, "threads": args.threads, "device": args.device}
    rows: list[Row] = []

    def measure(label: str, **spec: Any) -> None:
        out = str(tmp / f"{name}-{len(rows)}.pt")
        result = run({**base, **spec, "out": out})
        rows.append((label, result, torch.load(out)))
        report(label, result)

    def report(label: str, result: dict[str, Any]) -> None:
        gpu = f", {result['gpu_peak_mb']:.0f} MB GPU peak" if result["gpu_peak_mb"] else ""
        print(f"  {label}: {result['wall']:.2f} s wall ({result['detector_wall']:.2f} s in the detector), "
              f"{result['cpu']:.2f} s CPU ({result['detector_cpu']:.2f} s in the detector), "
              f"+{result['peak_mb']:.0f} MB peak{gpu}", flush=True)

    print(f"\n{name} detector, {SIDES[name]} x {SIDES[name]} px")
    # the timed runs at N take turns, round after round, so a change in the machine's other load falls on
    # all of them alike; each one's median over the rounds
    timed = [(f"ours, chunk {c}", {"impl": "ours", "chunk": c}) for c in chunks]
    timed.append(("peer", {"impl": "peer", "chunk": 1}))
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in timed}
    for _ in range(args.repeats):
        for label, spec in timed:
            result = run({**base, **spec, "n": args.n, "seed": 0, "out": str(tmp / f"{name}-{label}.pt")})
            runs[label].append(result)
            report(label, result)
    for label, _ in timed:
        results = runs[label]
        keys = ("wall", "cpu", "detector_cpu", "detector_wall")
        median = {k: statistics.median(r[k] for r in results) for k in keys}
        rows.append((label, {**results[0], **median, "peak_mb": max(r["peak_mb"] for r in results)},
                     torch.load(tmp / f"{name}-{label}.pt")))
    if compare:
        measure(f"reference: ours N={args.ref_n}", impl="ours", n=args.ref_n, seed=1, chunk=chunks[0])
        if args.peer_ref_n and name == "planted":
            measure(f"reference: peer N={args.peer_ref_n}", impl="peer", n=args.peer_ref_n, seed=1, chunk=1)
        for n in (int(v) for v in args.curve.split(",") if v):
            measure(f"ours N={n}, chunk {chunks[0]}", impl="ours", n=n, seed=0, chunk=chunks[0])
    first = rows[0][1]
    print(f"target box {[round(v, 1) for v in first['box']]}, score {first['score']:.3f}\n")
    return rows


def print_table(rows: list[Row], chunks: list[int], compare: bool) -> None:
    """Times are per image. "rest": the CPU time outside the detector's forwards (masks, masked copies,
    weights, sums; the peer's record conversions too)."""
    peer = rows[len(chunks)][1]
    refs = {label.split(":")[1].split()[0]: heat for label, _, heat in rows if label.startswith("reference")}
    head = ("| run | s wall / CPU | detector CPU s (ms a forward) | rest CPU s | peer / this: CPU, rest CPU "
            "| peer / this: wall | detector wall s | peak MB (GPU MB) |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if compare:
        head += " corr, ours ref | raw sum: corr, ours ref's |"
        head += " corr, peer ref |" if "peer" in refs else ""
        rule += "---:|---:|" + ("---:|" if "peer" in refs else "")
    print(head)
    print(rule)
    for label, r, (heat, raw) in rows:
        rest, peer_rest = r["cpu"] - r["detector_cpu"], peer["cpu"] - peer["detector_cpu"]
        gpu = f" ({r['gpu_peak_mb']:.0f})" if r["gpu_peak_mb"] else ""
        line = (f"| {label} | {r['wall']:.2f} / {r['cpu']:.2f} | {r['detector_cpu']:.2f} "
                f"({1e3 * r['detector_cpu'] / max(r['forwards'], 1):.1f}) | {rest:.2f} | "
                f"{peer['cpu'] / r['cpu']:.1f}x, {peer_rest / max(rest, 1e-9):.1f}x | "
                f"{peer['wall'] / r['wall']:.1f}x | {r['detector_wall']:.2f} | {r['peak_mb']:.0f}{gpu} |")
        if compare:
            ours_ref, ours_raw = refs["ours"]
            raw_corr = "" if torch.isnan(raw).any() else f"{corr(raw, ours_raw):.3f}"
            line += f" {corr(heat, ours_ref):.3f} | {raw_corr} |"
            if "peer" in refs:
                line += f" {corr(heat, refs['peer'][0]):.3f} |"
        print(line)


if __name__ == "__main__":
    main()
