"""What an upload's size costs outside the model pass: decoding, input resize, gray PNG and overlay, per size.

    .venv/bin/python bench/photo_sizes.py [--repeats 3]

A phone photo is 12 MP; the service resizes it to the model's input, and with `size=original` (the default)
returns maps and overlays at 12 MP. Each row times the service's function (service.zoo.preprocess,
service.imaging) against a plain Pillow/numpy baseline run in this process on the same data: Pillow's full
resampling filter, float64 blending and PNG at zlib level 6 (Pillow's default). It also prints what the
faster path gives up: the largest pixel difference and the encoded size.

The photo is skimage's chelsea, upscaled (bicubic) with a little noise so that it compresses like a photo,
and encoded as a JPEG at quality 90. Times are the minimum of --repeats calls.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import imaging  # noqa: E402
from service.zoo.cards import PreprocessSpec  # noqa: E402
from service.zoo.preprocess import Preprocessor  # noqa: E402

SIZES = [(451, 300), (1600, 1200), (4032, 3024)]


def photo_jpeg(width: int, height: int) -> bytes:
    from skimage import data

    base = Image.fromarray(data.chelsea())
    pixels = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    if (width, height) != base.size:
        pixels = pixels + np.random.default_rng(0).integers(-6, 7, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def baseline_decode(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def best_ms(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), result


# --- the baselines: what the service did before (and what a plain Pillow/numpy user writes) ------------

def baseline_resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def baseline_png_gray(heat: np.ndarray) -> bytes:
    gray = np.round(np.clip(np.nan_to_num(heat.astype(np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def baseline_overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> bytes:
    base = np.asarray(image, dtype=np.float32)
    unit = np.clip(np.nan_to_num(heat.astype(np.float64)), 0.0, 1.0)
    colours = imaging.COLORMAPS["jet"][np.round(unit * 255.0).astype(np.intp)].astype(np.float32)
    blended = Image.fromarray(np.round((1.0 - alpha) * base + alpha * colours).astype(np.uint8))
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def photo_rows(width: int, height: int, preprocess: Preprocessor, limits: dict[str, int],
               repeats: int) -> list[tuple]:
    """One photo size's table rows: each step timed for the service and for the baseline."""
    rows = []
    jpeg = photo_jpeg(width, height)
    image = baseline_decode(jpeg)
    # A smooth map at the photo's size, as the worker hands it to the encoder (size=original).
    small = np.random.default_rng(1).random((7, 7)).astype(np.float32)
    heat = imaging.resize_map(small, (width, height))
    label = f"{width}x{height} ({width * height / 1e6:.1f} MP)"

    def decode_and_resize():
        upload = imaging.decode_upload(jpeg, **limits, min_side=preprocess.decode_side)
        return np.asarray(preprocess._resized(upload.image))

    ours_ms, ours = best_ms(decode_and_resize, repeats)
    base_ms, base = best_ms(lambda: baseline_resize(baseline_decode(jpeg), (224, 224)), repeats)
    rows.append((label, "decode the JPEG and resize to 224x224", ours_ms, base_ms,
                 f"max diff {np.abs(ours.astype(int) - base.astype(int)).max()} levels", ""))

    ours_ms, ours = best_ms(lambda: np.asarray(preprocess._resized(image)), repeats)
    base_ms, base = best_ms(lambda: baseline_resize(image, (224, 224)), repeats)
    rows.append((label, "resize to 224x224", ours_ms, base_ms,
                 f"max diff {np.abs(ours.astype(int) - base.astype(int)).max()} levels", ""))

    ours_ms, ours = best_ms(lambda: imaging.encode_png_gray(heat), repeats)
    base_ms, base = best_ms(lambda: baseline_png_gray(heat), repeats)
    rows.append((label, "gray PNG", ours_ms, base_ms,
                 f"max diff {np.abs(decoded(ours) - decoded(base)).max()} levels",
                 f"{len(ours) / 1e6:.2f} / {len(base) / 1e6:.2f} MB"))

    ours_ms, ours = best_ms(lambda: imaging.encode_png(imaging.overlay(image, heat), photo=True), repeats)
    base_ms, base = best_ms(lambda: baseline_overlay(image, heat), repeats)
    rows.append((label, "overlay PNG", ours_ms, base_ms,
                 f"max diff {np.abs(decoded(ours) - decoded(base)).max()} levels",
                 f"{len(ours) / 1e6:.2f} / {len(base) / 1e6:.2f} MB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    preprocess = Preprocessor(PreprocessSpec(input_size=(224, 224), mean=(0.485, 0.456, 0.406),
                                             std=(0.229, 0.224, 0.225), interpolation="bilinear"))
    rows = []
    limits = dict(max_bytes=50_000_000, max_pixels=50_000_000)
    for width, height in SIZES:
        rows += photo_rows(width, height, preprocess, limits, args.repeats)

    print("| photo | step | service ms | baseline ms | ratio | what differs | bytes (service / baseline) |")
    print("|---|---|---:|---:|---:|---|---|")
    for label, step, ours_ms, base_ms, diff, size in rows:
        print(f"| {label} | {step} | {ours_ms:.1f} | {base_ms:.1f} | {ours_ms / base_ms:.2f} | {diff} "
              f"| {size} |")


if __name__ == "__main__":
    main()
