"""The HTTP API on a real uvicorn server over loopback."""
from __future__ import annotations

import base64
import contextlib
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.engine import explain
from service.imaging import decode_image, overlay, resize_map
from service.methods import METHODS
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS, SUITE_MODELS
from tests.server import running_server

QUICK = {"integrated-gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4},
         "moreaugrad": {"iterations": 3, "n_samples": 2}}


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def npy(b64: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)


def random_image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["embedded", "process", pytest.param("ray", marks=pytest.mark.ray)])
def server(request, registry):
    """The API contract runs against every engine: the in-process queue with its passes on a thread, or in
    child processes (service/engine_process.py), and Ray Serve (tests/ray_server.py)."""
    if request.param == "ray":
        yield request.getfixturevalue("ray_server")
        return
    settings = Settings(max_wait_ms=20, cache_bytes=0)  # every call computes
    if request.param == "process":
        # the children load the suite's models, as the embedded engine's registry holds
        with running_server(settings.model_copy(update={"worker": "process", "models": SUITE_MODELS})) as (
                base, app):
            yield base, app
        return
    with running_server(settings, registry) as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def chelsea_png(chelsea) -> bytes:
    return png_bytes(chelsea)


@pytest.mark.parametrize("form", ["multipart", "json"])
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"attention-relevance"}))  # a CNN: refused, 422
def test_each_method_explains_chelsea(server, chelsea_png, chelsea, method, form):
    base, _ = server
    params = QUICK.get(method, {})
    if form == "multipart":
        r = httpx.post(f"{base}/v1/explain/{method}",
                       files=[("image", ("cat.png", chelsea_png, "image/png"))],
                       data={"outputs": "npy,png,overlay", **{k: str(v) for k, v in params.items()}},
                       timeout=120)
    else:
        r = httpx.post(f"{base}/v1/explain/{method}", timeout=120, json={
            "images": [base64.b64encode(chelsea_png).decode()], "params": params,
            "outputs": ["npy", "png", "overlay"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "efficientnet_lite0" and body["method"] == method
    assert all(body["params"][k] == v for k, v in params.items())
    [res] = body["results"]
    assert res["label"] == "Egyptian cat" and res["top_k"][0]["index"] == res["target"] == 285
    heat = npy(res["map"]["npy"])
    assert heat.dtype == np.float32 and heat.shape == (chelsea.height, chelsea.width) == (300, 451)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1 and heat.std() > 0.05
    gray = Image.open(io.BytesIO(base64.b64decode(res["map"]["png"])))
    assert gray.mode == "L" and gray.size == (451, 300)
    assert Image.open(io.BytesIO(base64.b64decode(res["map"]["overlay"]))).size == (451, 300)
    assert res["timing_ms"]["compute"] > 0


def test_size_input_and_raw(server, chelsea_png):
    base, _ = server
    # At the original size the worker resizes the map (engine.resize_maps; asked first, so that no cached
    # result of a size=input call can stand in for it). Pillow's resize of the input-size map is the oracle.
    r = httpx.post(f"{base}/v1/explain/gradient", files=[("image", ("c.png", chelsea_png, "image/png"))],
                   timeout=60)
    original = npy(r.json()["results"][0]["map"]["npy"])
    assert original.shape == (300, 451)
    r = httpx.post(f"{base}/v1/explain/gradient", files=[("image", ("c.png", chelsea_png, "image/png"))],
                   data={"size": "input", "outputs": "npy,raw"}, timeout=60)
    res = r.json()["results"][0]
    assert npy(res["map"]["npy"]).shape == (224, 224)
    raw = npy(res["raw"])
    assert raw.shape == (3, 224, 224) and (raw < 0).any() and (raw > 0).any()
    np.testing.assert_allclose(original, resize_map(npy(res["map"]["npy"]), (451, 300)), atol=2e-5)


def test_accept_png_returns_the_overlay(server, chelsea_png):
    base, _ = server
    r = httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("c.png", chelsea_png, "image/png"))],
                   headers={"Accept": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (451, 300)


def test_a_large_jpeg_decoded_reduced_is_explained_and_overlaid_at_its_full_size(server, chelsea, registry):
    """The model input comes from a half-scale decode (imaging.decode_upload); the map and the overlay are at
    the upload's size, the overlay over the whole decode."""
    base, _ = server
    buffer = io.BytesIO()
    chelsea.resize((2016, 1344), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=92)
    blob = buffer.getvalue()
    r = httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("big.jpg", blob, "image/jpeg"))],
                   data={"outputs": "npy,overlay"}, timeout=120)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    heat = npy(res["map"]["npy"])
    assert heat.shape == (1344, 2016) and res["label"] == "Egyptian cat"
    whole = decode_image(blob, max_bytes=len(blob), max_pixels=2016 * 1344)
    got = Image.open(io.BytesIO(base64.b64decode(res["map"]["overlay"])))
    assert got.size == (2016, 1344) and np.array_equal(np.asarray(got), np.asarray(overlay(whole, heat)))
    # The prediction from the whole decode, in process: the same class, nearly the same probability.
    model = registry.models["efficientnet_lite0"]
    with torch.no_grad():
        probability = model.module(model.preprocess(whole).unsqueeze(0)).softmax(1)[0, res["target"]].item()
    assert abs(res["probability"] - probability) < 0.01


def direct(registry, image: Image.Image, method: str, target, params) -> np.ndarray:
    model = registry.models["tiny_cnn"]
    x = model.preprocess(image).unsqueeze(0)
    [res] = explain(model, METHODS[method], x, [target], METHODS[method].Params(**params))
    return res.heatmap.numpy()


def batch_sizes(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    out = {}
    for m in re.finditer(r'saliency_batch_size_(sum|count)\{method="gradcam"\} ([0-9.e+]+)', text):
        out[m.group(1)] = float(m.group(2))
    return out


def test_concurrent_requests_are_batched_and_each_gets_its_own_result(server, registry):
    base, _ = server
    before = batch_sizes(base)
    images = [random_image(i) for i in range(16)]
    targets = [i % 10 for i in range(16)]

    def one(i):
        return httpx.post(f"{base}/v1/explain/gradcam", timeout=60, data={
            "model": "tiny_cnn", "target": str(targets[i]), "size": "input"},
            files=[("image", (f"{i}.png", png_bytes(images[i]), "image/png"))])

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    after = batch_sizes(base)
    batches = after["count"] - before.get("count", 0)
    items = after["sum"] - before.get("sum", 0)
    assert items == 16 and batches < 16, "some batches must hold more than one request"
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["target"] == targets[i]
        np.testing.assert_allclose(npy(res["map"]["npy"]),
                                   direct(registry, images[i], "gradcam", targets[i], {}), atol=1e-5)


def test_mixed_methods_and_models_in_flight_and_a_bad_image_fails_alone(server, registry, chelsea_png):
    base, _ = server
    jobs = []
    for i in range(12):
        method = ["gradcam", "gradient", "smoothgrad", "fullgrad"][i % 4]
        jobs.append(("tiny", i, method))
    jobs.insert(6, ("bad", 99, "gradcam"))
    jobs.insert(3, ("cat", 100, "gradcam"))

    def one(job):
        kind, i, method = job
        if kind == "bad":
            blob = b"<html>not an image</html>"
        elif kind == "cat":
            blob = chelsea_png
        else:
            blob = png_bytes(random_image(i))
        data = {"size": "input", **({"model": "tiny_cnn"} if kind != "cat" else {}),
                **({"n_samples": "3"} if method == "smoothgrad" else {})}
        return job, httpx.post(f"{base}/v1/explain/{method}", data=data, timeout=60,
                               files=[("image", ("x.png", blob, "image/png"))])

    with ThreadPoolExecutor(14) as pool:
        results = list(pool.map(one, jobs))
    for (kind, i, method), r in results:
        if kind == "bad":
            assert r.status_code == 400 and "image 0" in r.json()["error"]["message"]
        elif kind == "cat":
            assert r.status_code == 200 and r.json()["results"][0]["label"] == "Egyptian cat"
        else:
            assert r.status_code == 200, r.text
            res = r.json()["results"][0]
            params = {"n_samples": 3} if method == "smoothgrad" else {}
            np.testing.assert_allclose(npy(res["map"]["npy"]),
                                       direct(registry, random_image(i), method, None, params), atol=1e-5)


def test_catalog(server):
    base, _ = server
    models = {m["name"]: m for m in httpx.get(f"{base}/v1/models").json()}
    lite = models["efficientnet_lite0"]
    assert (lite["available"] and lite["default"] and lite["input_size"] == [224, 224]
            and lite["num_classes"] == 1000)
    assert "bn2" in lite["layers"] and "conv_head" in lite["layers"] and lite["device"] in ("cpu", "ray:auto")
    assert lite["folded_batchnorms"] == 49  # every BatchNorm of the model (service/zoo/fold.py)
    assert not models["resnet50"]["available"] and "weights" in models["resnet50"]["reason"]
    methods = {m["name"]: m for m in httpx.get(f"{base}/v1/methods").json()}
    assert set(methods) == set(METHODS) | {"drise"}  # and the detectors' D-RISE
    assert methods["drise"]["tasks"] == ["detection"] and "detection" in methods["gradcam"]["tasks"]
    ig = methods["integrated-gradients"]["parameters"]["properties"]["n_steps"]
    assert ig["default"] == 50 and ig["minimum"] == 1 and ig["maximum"] == 1024


def test_errors_are_json_with_codes(server, chelsea_png):
    base, _ = server
    b64 = base64.b64encode(chelsea_png).decode()
    cases = [
        (httpx.post(f"{base}/v1/explain/nope", json={"images": [b64]}), 404, "unknown method"),
        (httpx.post(f"{base}/v1/explain/gradcam", json={"images": [b64], "model": "zzz"}), 404,
         "unknown model"),
        (httpx.post(f"{base}/v1/explain/gradcam", json={"images": [b64], "model": "resnet50"}), 404,
         "unavailable"),
        (httpx.post(f"{base}/v1/explain/gradcam", json={"images": [b64], "params": {"layer": "nope"}}), 422,
         "layer"),
        (httpx.post(f"{base}/v1/explain/gradcam", json={"images": [b64], "targets": [1000]}), 422,
         "out of range"),
        (httpx.post(f"{base}/v1/explain/smoothgrad",
                    json={"images": [b64], "params": {"n_samples": 10**6}}), 422, "n_samples"),
        (httpx.post(f"{base}/v1/explain/gradcam", content=b"{",
                    headers={"content-type": "application/json"}), 400, "malformed JSON"),
        (httpx.post(f"{base}/v1/explain/gradcam", json={"images": []}), 422, "images"),
        (httpx.post(f"{base}/v1/explain/gradcam", content=b"x", headers={"content-type": "text/plain"}), 415,
         "content type"),
        (httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("a", b"", "image/png"))]), 400,
         "image 0"),
        (httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("a", chelsea_png, "image/png"))],
                    data={"target": "cat"}), 422, "not an integer"),
        (httpx.get(f"{base}/v1/jobs/unknown"), 404, "no job"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, (r.status_code, r.text)
        assert text in r.json()["error"]["message"], r.text
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    # probes
    assert httpx.head(f"{base}/healthz").status_code == httpx.head(f"{base}/readyz").status_code == 200


def test_job_progress_advances_and_completes(server):
    base, _ = server
    blob = png_bytes(random_image(1))
    r = httpx.post(f"{base}/v1/jobs",
                   data={"method": "moreaugrad", "model": "tiny_cnn", "iterations": "60", "n_samples": "4"},
                   files=[("image", ("x.png", blob, "image/png"))])
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job_id = r.json()["id"]
    seen = []
    for _ in range(600):
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        seen.append(job["progress"]["done"])
        if job["status"] == "succeeded":
            break
        time.sleep(0.01)
    assert job["status"] == "succeeded" and job["progress"] == {"done": 60, "total": 60}
    assert len(set(seen)) > 2, "progress should be seen advancing"
    assert job["result"]["results"][0]["map"]["npy"]


def test_a_job_shows_running_before_its_only_progress_report(server):
    # SmoothGrad reports progress once, when its image is done; in between the job must say "running".
    base, _ = server
    r = httpx.post(f"{base}/v1/jobs", data={"method": "smoothgrad", "model": "tiny_cnn", "n_samples": "256"},
                   files=[("image", ("x.png", png_bytes(random_image(8)), "image/png"))])
    assert r.status_code == 202
    seen = []
    for _ in range(3000):
        job = httpx.get(f"{base}/v1/jobs/{r.json()['id']}").json()
        seen.append((job["status"], job["progress"]["done"]))
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.01)
    assert job["status"] == "succeeded" and ("running", 0) in seen, seen[-5:]


def test_job_cancel(server):
    base, _ = server
    blob = png_bytes(random_image(2))
    r = httpx.post(f"{base}/v1/jobs",
                   data={"method": "moreaugrad", "model": "tiny_cnn", "iterations": "2000", "n_samples": "8"},
                   files=[("image", ("x.png", blob, "image/png"))])
    job_id = r.json()["id"]
    while httpx.get(f"{base}/v1/jobs/{job_id}").json()["progress"]["done"] < 5:
        time.sleep(0.02)
    assert httpx.delete(f"{base}/v1/jobs/{job_id}").status_code == 200
    for _ in range(200):
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if job["status"] == "cancelled":
            break
        time.sleep(0.02)
    assert job["status"] == "cancelled" and job["progress"]["done"] < 2000
    # the worker is free again
    r = httpx.post(f"{base}/v1/explain/gradcam", data={"model": "tiny_cnn"},
                   files=[("image", ("x.png", blob, "image/png"))], timeout=30)
    assert r.status_code == 200


@contextlib.contextmanager
def busy_worker(app, seconds: float):
    """Holds the interactive worker in its next batch for `seconds` (a slow batch, injected)."""
    runtime = app.state.runtime
    runtime.backend.fault_hook = lambda items: time.sleep(seconds)
    blocker = threading.Thread(target=httpx.post, args=(f"{app.state.base}/v1/explain/gradcam",),
                               kwargs={"files": [("image", ("x.png", png_bytes(random_image(3)),
                                                            "image/png"))],
                                       "timeout": 60})
    blocker.start()
    while not runtime.backend.lanes["interactive"].pool.running:  # the blocker's batch has started
        time.sleep(0.01)
    runtime.backend.fault_hook = None
    try:
        yield
    finally:
        blocker.join()


@pytest.fixture
def small_registry():
    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})


def test_queue_full_is_429_with_retry_after(small_registry):
    settings = Settings(default_model="tiny_cnn", max_queue=2, max_wait_ms=0)
    with running_server(settings, small_registry) as (base, app), busy_worker(app, 3.0):
        blob = png_bytes(random_image(4))
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{base}/v1/explain/gradcam", timeout=60,
                                   files=[("image", ("x.png", blob, "image/png"))]) for _ in range(6)]
            # 429s answer at once; the rest wait for the worker
            rejected = next(as_completed(futures)).result()
            statuses = sorted(f.result().status_code for f in futures)
        assert rejected.status_code == 429 and rejected.json()["error"]["code"] == "queue_full"
        assert int(rejected.headers["retry-after"]) >= 1
        assert statuses == [200, 200, 429, 429, 429, 429]  # the two the queue held were served, nothing lost


def test_deadline_passed_before_start_is_504(small_registry):
    settings = Settings(default_model="tiny_cnn", queue_deadline_s=0.2, max_wait_ms=0)
    with running_server(settings, small_registry) as (base, app), busy_worker(app, 1.5):
        r = httpx.post(f"{base}/v1/explain/gradcam",
                       files=[("image", ("x.png", png_bytes(random_image(5)), "image/png"))], timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


def test_the_images_of_a_started_call_do_not_expire_behind_each_other(small_registry):
    """The start deadline is the call's: once its first image runs, the others run too, even past it. Before,
    each image had its own deadline, and the last of a call whose images ran one after another got a 504
    (issue 24, finding 1)."""
    settings = Settings(default_model="tiny_cnn", queue_deadline_s=1.0, max_batch_items=1, cache_bytes=0)
    with running_server(settings, small_registry) as (base, app):
        # one image per batch, 0.7 s each
        app.state.runtime.backend.fault_hook = lambda items: time.sleep(0.7)
        files = [("image", (f"{i}.png", png_bytes(random_image(20 + i)), "image/png")) for i in range(3)]
        r = httpx.post(f"{base}/v1/explain/gradcam", files=files, timeout=30)  # the third starts at ~1.4 s
        app.state.runtime.backend.fault_hook = None
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 3


def test_sync_request_over_its_wait_becomes_a_job(small_registry):
    settings = Settings(default_model="tiny_cnn", sync_wait_s=0.3)
    with running_server(settings, small_registry) as (base, _):
        # ~5 s of work here (0.065 s an iteration), well past the 0.3 s wait
        r = httpx.post(f"{base}/v1/explain/moreaugrad", data={"iterations": "80", "n_samples": "8"},
                       files=[("image", ("x.png", png_bytes(random_image(6)), "image/png"))], timeout=30)
        assert r.status_code == 202
        job_id = r.json()["id"]
        for _ in range(600):
            job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
            if job["status"] == "succeeded":
                break
            time.sleep(0.05)
        assert job["status"] == "succeeded" and job["result"]["method"] == "moreaugrad"


def test_a_job_is_running_as_soon_as_the_worker_takes_it(small_registry):
    # SmoothGrad reports progress only when its image is done; the status must not say "queued" meanwhile.
    entered, release = threading.Event(), threading.Event()
    with running_server(Settings(default_model="tiny_cnn"), small_registry) as (base, app):
        app.state.runtime.backend.fault_hook = lambda items: (entered.set(), release.wait(30))
        r = httpx.post(f"{base}/v1/jobs", data={"method": "smoothgrad", "n_samples": "4"},
                       files=[("image", ("x.png", png_bytes(random_image(9)), "image/png"))], timeout=30)
        assert r.status_code == 202 and entered.wait(30)
        job = httpx.get(f"{base}/v1/jobs/{r.json()['id']}").json()
        assert job["status"] == "running" and job["progress"] == {"done": 0, "total": 1}
        release.set()
        for _ in range(600):
            job = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
            if job["status"] != "running":
                break
            time.sleep(0.05)
        assert job["status"] == "succeeded" and job["progress"] == {"done": 1, "total": 1}


def cache_counts(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics").text
    hits = float(re.search(r"^saliency_cache_hits ([0-9.e+]+)$", text, re.M).group(1))
    misses = float(re.search(r"^saliency_cache_misses ([0-9.e+]+)$", text, re.M).group(1))
    return hits, misses


def test_a_repeated_request_is_answered_from_the_cache(small_registry):
    with running_server(Settings(default_model="tiny_cnn"), small_registry) as (base, app):
        blob = png_bytes(random_image(7))

        def call(**data):
            return httpx.post(f"{base}/v1/explain/smoothgrad",
                              files=[("image", ("x.png", blob, "image/png"))],
                              data={"n_samples": "4", **data}, timeout=30).json()["results"][0]

        first = call()
        pool = app.state.runtime.backend.lanes["interactive"].pool
        deadline = time.monotonic() + 10
        while pool.running and time.monotonic() < deadline:  # the answer can come before the batch is counted
            time.sleep(0.01)
        batches = pool.stats.batches
        again = call()
        assert cache_counts(base) == (1, 1)
        assert app.state.runtime.backend.lanes["interactive"].pool.stats.batches == batches  # no model pass
        assert again["timing_ms"]["compute"] == 0 and again["map"]["npy"] == first["map"]["npy"]
        call(seed="1")  # other params: a miss
        call(target="3")  # another target: a miss
        assert cache_counts(base) == (1, 3)


def test_a_caller_hanging_up_cancels_its_queued_work(small_registry):
    settings = Settings(default_model="tiny_cnn", max_wait_ms=0)
    with running_server(settings, small_registry) as (base, app), busy_worker(app, 1.5):
        runtime = app.state.runtime
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/explain/gradcam",
                       files=[("image", ("x.png", png_bytes(random_image(8)), "image/png"))], timeout=0.5)
        deadline = time.monotonic() + 5
        while runtime.backend.lanes["interactive"].pool.stats.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # dropped from the queue, never computed
        assert runtime.backend.lanes["interactive"].pool.stats.cancelled == 1


def test_json_bodies_are_strict_json_even_with_non_finite_numbers():
    import json
    import math

    from service.api.responses import FastJSONResponse

    content = {"map": {"npy": "AAAA" * 10}, "diagnostics": {"gap": math.nan, "ratio": math.inf}, "p": 0.25}
    body = FastJSONResponse(content).body
    assert json.loads(body) == {**content, "diagnostics": {"gap": None, "ratio": None}}  # no NaN tokens
    # Types orjson does not know natively still serialise (pydantic-core converts them).
    params = METHODS["gradcam"].Params()
    body = FastJSONResponse({"params": params, "scale": np.float32(0.5), "size": (3, 4), 7: "seven"}).body
    assert json.loads(body) == {"params": params.model_dump(mode="json"), "scale": 0.5, "size": [3, 4],
                                "7": "seven"}
