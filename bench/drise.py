#!/usr/bin/env python
"""D-RISE (service/detection/drise.py) against Microsoft's vision-explanation-methods (`DRISE_saliency`):
time and peak memory per image, and each map's correlation with a high-N reference.

    .venv/bin/python -m pip install --no-deps vision-explanation-methods==0.1.1   # the peer (see below)
    .venv/bin/python bench/drise.py                         # planted and MTCNN detectors, N=1000, s=16
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
  A torchvision Faster R-CNN with random weights was not used: its detections (if any pass the threshold)
  mean nothing, so the maps would compare noise.

Each measured call runs in its own subprocess (fresh peak RSS; --threads intra-op threads, 1 by default: on
a machine shared with other jobs a second OpenMP thread mostly waits, see docs/benchmarks.md "Per-map
metrics"); the time is wall clock and process CPU time of the D-RISE call alone (the detector built and the
target found before the clock starts). Correlation: Pearson over the pixels of the displayed maps against a
reference map of --ref-n masks computed by ours with another seed (so ours at N shares no mask with it), and
against the peer's own at --peer-ref-n masks where given. "raw sum": ours' sum_i w_i M_i (the paper's formula,
not centred) against the reference's, which shows what the centring buys at a given N.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
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
SIDES = {"planted": 224, "mtcnn": 160}  # MTCNN costs ~50 ms a forward here at 160 px; 224 doubles the run


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


def detector(name: str, image: torch.Tensor):
    if name == "planted":
        return Planted(image)
    from service.detection.mtcnn import MtcnnDetector

    return MtcnnDetector.from_package(torch.device("cpu"))


def peer_map(detect, image: torch.Tensor, target: Detections, n: int, grid: int, seed: int) -> torch.Tensor:
    from vision_explanation_methods.explanations import drise as peer
    from vision_explanation_methods.explanations.common import (
        DetectionRecord,
        GeneralObjectDetectionModelWrapper,
    )

    def record(d: Detections) -> DetectionRecord:
        # one class: the class vector is (1,) per detection, cosine 1; objectness is the score
        return DetectionRecord(bounding_boxes=d.boxes, objectness_scores=d.scores,
                               class_scores=d.class_vectors(1))

    class Wrapper(GeneralObjectDetectionModelWrapper):
        def predict(self, x: torch.Tensor) -> list[DetectionRecord]:
            return [record(d) for d in detect(x)]

    torch.manual_seed(seed)  # the peer draws its masks and crops from torch's global generator
    out = peer.DRISE_saliency(Wrapper(), image[None], [record(target)], n, (grid, grid), device="cpu")
    return out[0][0]["detection"][0]  # (3, H, W), the channels equal


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    image = photo(SIDES[spec["detector"]])
    detect = detector(spec["detector"], image)
    with torch.no_grad():
        found = detect(image[None])[0]
    if len(found) == 0:
        raise SystemExit(f"{spec['detector']}: no detection on the clean image")
    best = int(found.scores.argmax())
    target = Detections(found.boxes[best:best + 1], found.labels[best:best + 1], found.scores[best:best + 1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if spec["impl"] == "ours":
            settings = DriseSettings(spec["n"], spec["grid"], 0.5, spec["seed"])
            maps, info = drise(detect, image, target, 1, settings, chunk=spec["chunk"])
            heat, raw = maps[0], info["raw"][0]
        else:
            heat = peer_map(detect, image, target, spec["n"], spec["grid"], spec["seed"])
            raw = torch.full_like(heat, float("nan"))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(torch.stack([heat.float(), raw.float()]), spec["out"])
    return {"wall": wall, "cpu": cpu, "peak_mb": (after - before) / 1024, "box": target.boxes[0].tolist(),
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
    ap.add_argument("--detectors", default="planted,mtcnn")
    ap.add_argument("--n", type=int, default=1000, help="masks per image, both sides (the service's default)")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--chunks", default="32,1", help="ours: masked images per detector call (the first is "
                                                     "the one the ratio is taken at)")
    ap.add_argument("--ref-n", type=int, default=5000, help="masks of the reference (ours, another seed)")
    ap.add_argument("--curve", default="250,500,2000", help="ours at these N too (the first chunk): how the "
                                                            "correlation grows with N ('' for none)")
    ap.add_argument("--peer-ref-n", type=int, default=4000,
                    help="masks of the peer's own reference, planted detector only (0: none); its memory "
                         "is ~N x 3 x H x W floats")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, torch "
          f"{torch.__version__}, threads {args.threads}, N={args.n}, grid {args.grid}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.detectors.split(","):
            side = SIDES[name]
            base = {"detector": name, "grid": args.grid, "threads": args.threads}
            rows: list[tuple[str, dict[str, Any], torch.Tensor]] = []

            def measure(label: str, rows=rows, base=base, **spec: Any) -> None:
                out = str(Path(tmp) / f"{base['detector']}-{len(rows)}.pt")
                result = run({**base, **spec, "out": out})
                rows.append((label, result, torch.load(out)))
                print(f"  {label}: {result['wall']:.2f} s wall, {result['cpu']:.2f} s CPU, "
                      f"+{result['peak_mb']:.0f} MB peak", flush=True)

            print(f"\n{name} detector, {side} x {side} px")
            for c in chunks:
                measure(f"ours, chunk {c}", impl="ours", n=args.n, seed=0, chunk=c)
            measure("peer", impl="peer", n=args.n, seed=0, chunk=1)
            measure(f"reference: ours N={args.ref_n}", impl="ours", n=args.ref_n, seed=1, chunk=chunks[0])
            ref, ref_raw = rows[-1][2]
            peer_ref = None
            if args.peer_ref_n and name == "planted":
                measure(f"reference: peer N={args.peer_ref_n}", impl="peer", n=args.peer_ref_n, seed=1,
                        chunk=1)
                peer_ref = rows[-1][2][0]
            for n in (int(v) for v in args.curve.split(",") if v):
                measure(f"ours N={n}, chunk {chunks[0]}", impl="ours", n=n, seed=0, chunk=chunks[0])
            first = rows[0][1]
            print(f"target box {[round(v, 1) for v in first['box']]}, score {first['score']:.3f}\n")
            head = ("| run | s per image (wall / CPU) | peer / this (wall / CPU) | peak MB "
                    "| corr with ours ref | raw sum: corr with ref's |")
            head += " corr with peer ref |" if peer_ref is not None else ""
            print(head)
            print("|---|---:|---:|---:|---:|---:|" + ("---:|" if peer_ref is not None else ""))
            peer = rows[len(chunks)][1]
            for label, result, (heat, raw) in rows:
                raw_corr = "" if torch.isnan(raw).any() else f"{corr(raw, ref_raw):.3f}"
                line = (f"| {label} | {result['wall']:.2f} / {result['cpu']:.2f} | "
                        f"{peer['wall'] / result['wall']:.1f}x / {peer['cpu'] / result['cpu']:.1f}x | "
                        f"{result['peak_mb']:.0f} | {corr(heat, ref):.3f} | {raw_corr} |")
                if peer_ref is not None:
                    line += f" {corr(heat, peer_ref):.3f} |"
                print(line)


if __name__ == "__main__":
    main()
