"""An answer's size is bounded before any work runs (`max_response_bytes`: 413 `response_too_large`, naming
the requests that would fit), and the bound holds against real answers without being far above them for npy
maps (issue 24, finding 3: a 38 KB PNG of 6300x6300 was answered with 212 MB of JSON)."""
from __future__ import annotations

import base64
import io
import re

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.methods import get_method
from service.pipeline import AnswerBound
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server

SETTINGS = Settings(default_model="tiny_cnn", cache_bytes=0)  # every call computes


@pytest.fixture(scope="module")
def server():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(SETTINGS, registry) as (base, _):
        yield base, registry.models["tiny_cnn"]


def flat_png(width: int, height: int, colour=(90, 140, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def turned_jpeg(width: int, height: int) -> bytes:
    """A JPEG stored `width` x `height` whose EXIF says to turn it a quarter (its map is height x width)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def post(base: str, blobs: list[bytes], method="gradient", form="multipart", accept=None, **fields):
    headers = {"Accept": accept} if accept else {}
    url = f"{base}/v1/explain/{method}"
    if form == "json":
        body = {"images": [base64.b64encode(b).decode() for b in blobs], **fields}
        if isinstance(body.get("outputs"), str):
            body["outputs"] = body["outputs"].split(",")
        return httpx.post(url, json=body, headers=headers, timeout=120)
    files = [("image", (f"{i}.img", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]
    return httpx.post(url, data=fields, files=files, headers=headers, timeout=120)


def batches(base: str) -> float:
    """Batches the worker has run, all methods together (saliency_batch_size's count)."""
    text = httpx.get(f"{base}/metrics").text
    return sum(float(n) for n in re.findall(r"^saliency_batch_size_count\{[^}]*\} ([0-9.e+]+)$", text, re.M))


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_a_40_mp_float_map_is_refused_before_any_work_and_size_input_answers(server, form):
    base, _ = server
    blob = flat_png(6300, 6300)  # within max_image_pixels (40 MP) and max_image_bytes
    assert len(blob) < 200_000
    before = batches(base)
    r = post(base, [blob], form=form, outputs="npy", size="original")
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "response_too_large"
    message = error["message"]
    # the estimate, the limit and the setting; then the requests that would fit, each with its bound
    assert "211.7 MB" in message and "134.2 MB" in message and "max_response_bytes" in message, message
    assert "size=input" in message and "outputs=png" in message, message
    assert batches(base) == before, "no pass may run for a refused call"

    r = post(base, [blob], form=form, outputs="npy", size="input")
    assert r.status_code == 200, r.text
    assert (r.json()["results"][0]["map"]["height"], r.json()["results"][0]["map"]["width"]) == (64, 64)
    assert batches(base) == before + 1


def test_the_png_overlay_answer_is_bounded_too(server):
    base, _ = server
    blob = flat_png(6300, 6300)
    before = batches(base)
    r = post(base, [blob], accept="image/png", size="original")  # an RGB overlay of 40 MP
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "response_too_large"
    assert "outputs=overlay" in r.json()["error"]["message"] and "size=input" in r.json()["error"]["message"]
    assert batches(base) == before
    r = post(base, [blob], accept="image/png", size="input")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_too_many_large_images_are_told_how_many_fit(server):
    base, _ = server
    r = post(base, [flat_png(4000, 3000, (i, 2, 3)) for i in range(3)], outputs="npy", size="original")
    assert r.status_code == 413, r.text
    assert "2 of these images per request" in r.json()["error"]["message"], r.text


CALLS = [  # (images, method, outputs, size)
    ([noise_png(640, 480)], "gradient", "npy", "original"),
    ([noise_png(640, 480)], "gradient", "npy,png,overlay,raw", "original"),
    ([flat_png(1000, 700)], "gradcam", "npy", "input"),
    ([flat_png(1000, 700)], "gradcam", "npy,png,overlay,raw", "input"),
    ([turned_jpeg(300, 200)], "gradient", "npy", "original"),
    ([turned_jpeg(300, 200)], "gradient", "png,overlay", "original"),
    ([noise_png(200, 150, seed=i) for i in range(3)], "smoothgrad", "npy,overlay", "original"),
    ([noise_png(1500, 1000), flat_png(64, 64)], "fullgrad", "npy", "original"),
]


@pytest.mark.parametrize("images, method, outputs, size", CALLS)
def test_the_bound_holds_against_real_answers(server, images, method, outputs, size):
    base, model = server
    params = {"n_samples": "2"} if method == "smoothgrad" else {}
    r = post(base, images, method=method, outputs=outputs, size=size, **params)
    assert r.status_code == 200, r.text
    dims = [Image.open(io.BytesIO(blob)).size for blob in images]
    chosen = set(outputs.split(","))
    bound = AnswerBound(model, method, get_method(method).Params(**params), SETTINGS.top_k, dims)
    estimate = bound.total(chosen, size)
    assert len(r.content) <= estimate
    if chosen == {"npy"}:  # the .npy bound is exact but for the JSON around it: not far above
        assert estimate <= 4 * len(r.content), (estimate, len(r.content))
    if "png" not in chosen and "overlay" not in chosen:
        return
    for i, result in enumerate(r.json()["results"]):  # each PNG within its own bound, noise or not
        for output in chosen & {"png", "overlay"}:
            assert len(result["map"][output]) <= bound.image_bytes(i, {output}, size)
