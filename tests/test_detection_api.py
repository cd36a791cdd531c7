"""Detection models through the API (issue 27, item 4): POST /v1/explain/drise with the MTCNN face detector
on skimage's astronaut. Oracle: the map of the face box peaks inside the box (MTCNN is a black box to
D-RISE: what lights up is what keeps the face detected). The response's pinned shape: per image
`detections`, each `{box, label, score, map}` with the box in pixels of the upload; a detector that finds
nothing answers 200 with an empty list; out-of-range parameters, a box outside the image, a label the model
does not have, a classifier method asked of a detector and the reverse: each a clear 422."""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pybase64
import pytest
import torch
from PIL import Image

from service.imaging import decode_npy
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server

pytest.importorskip("facenet_pytorch", reason="facenet-pytorch: make venv installs it (--no-deps)")
data = pytest.importorskip("skimage.data")


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(detector_server):
    return detector_server


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    return png(data.astronaut())


def post(base: str, image: bytes, timeout: float = 120, **fields) -> httpx.Response:
    """The call's answer; one that outlasts the sync wait (a 202 job) is polled to its end."""
    r = httpx.post(f"{base}/v1/explain/drise", files=[("image", ("a.png", image, "image/png"))],
                   data={"model": "mtcnn", **{k: str(v) for k, v in fields.items()}}, timeout=timeout)
    if r.status_code != 202:
        return r
    view = wait(base, r.json()["id"])
    assert view["status"] == "succeeded", view
    return httpx.Response(200, json=view["result"])


def wait(base: str, job_id: str) -> dict:
    for _ in range(6000):
        view = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return view
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def test_the_face_boxs_map_peaks_inside_the_box(server):
    half = png(np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.LANCZOS)))
    r = post(server, half, n_masks=300, outputs="npy,overlay")  # at half size: MTCNN's forwards are the cost
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "mtcnn" and body["method"] == "drise" and body["task"] == "detection"
    [result] = body["results"]
    [face] = result["detections"]
    assert face["label"] == "face" and face["score"] > 0.99
    x1, y1, x2, y2 = face["box"]
    assert 85 < x1 < x2 < 140 and 25 < y1 < y2 < 95  # pixels of the 256 x 256 upload
    heat = decode_npy(pybase64.b64decode(face["map"]["npy"]))
    assert heat.shape == (256, 256) and face["map"]["overlay"]
    row, col = np.unravel_index(int(heat.argmax()), heat.shape)
    assert x1 <= col <= x2 and y1 <= row <= y2
    inside = heat[int(y1):int(y2), int(x1):int(x2)].mean()
    assert inside > 2 * heat.mean()
    assert face["diagnostics"]["n_masks"] == 300


def test_nothing_found_is_an_empty_list_not_an_error(server):
    r = post(server, png(np.full((96, 128, 3), 127, np.uint8)), n_masks=16)
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [{"width": 128, "height": 96, "detections": [],
                                    "timing_ms": r.json()["results"][0]["timing_ms"]}]


@pytest.mark.parametrize("fields, words", [
    ({"n_masks": 5}, "n_masks"),
    ({"n_masks": 100_000}, "n_masks"),
    ({"grid_size": 1}, "grid_size"),
    ({"keep_prob": 1.5}, "keep_prob"),
    ({"score_threshold": -0.1}, "score_threshold"),
    ({"box": "10,10,5,20"}, "x2 > x1"),
    ({"box": "100,100,900,200"}, "leaves the image"),
    ({"box": "180,60,270,170", "label": "cat"}, "label 'cat' is not a class of mtcnn"),
    ({"target": 3}, "target 3: the image has 1 detections"),
])
def test_bad_parameters_are_a_clear_422(server, astronaut, fields, words):
    r = post(server, astronaut, n_masks=fields.pop("n_masks", 16), **fields)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]["message"], r.json()


def test_a_box_and_label_pick_the_matching_detection(server, astronaut):
    r = post(server, astronaut, n_masks=16, box="182,62,268,172", label="face")
    assert r.status_code == 200 and len(r.json()["results"][0]["detections"]) == 1
    r = post(server, astronaut, n_masks=16, box="0,0,40,40")  # matches no detection: none explained
    assert r.status_code == 200 and r.json()["results"][0]["detections"] == []


def test_methods_and_tasks_that_do_not_go_together_are_a_422(server, astronaut):
    files = [("image", ("a.png", astronaut, "image/png"))]
    r = httpx.post(f"{server}/v1/explain/drise", files=files, data={"model": "tiny_cnn"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_applicable"
    assert "drise explains object detectors" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/explain/smoothgrad", files=files, data={"model": "mtcnn"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_applicable"
    assert "an object detector: its methods are ['drise', 'gradcam']" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/explain/gradcam", files=files, data={"model": "mtcnn"}, timeout=60)
    assert r.status_code == 422 and "black box" in r.json()["error"]["message"]


def test_the_detector_lists_its_pass_budget_from_the_settings(server):
    # the server runs the default settings on the CPU: cpu_pass_batch within max_pass_batch (budget.py)
    from service.settings import Settings

    models = {m["name"]: m for m in httpx.get(f"{server}/v1/models", timeout=30).json()}
    defaults = Settings()
    assert models["mtcnn"]["pass_batch"] == min(defaults.cpu_pass_batch, defaults.max_pass_batch)
    assert models["tiny_cnn"]["pass_batch"] is None


def test_a_detection_answer_adds_to_the_servers_timings(server, astronaut):
    # the viewer estimates a run before it is sent as n_masks x seconds per pass (GET /v1/timings)
    r = post(server, astronaut, n_masks=16)
    assert r.status_code == 200 and r.json()["results"][0]["detections"]
    timings = httpx.get(f"{server}/v1/timings", timeout=30).json()
    rates = {(x["model"], x["method"]): x for x in timings["rates"]}
    drise = rates[("mtcnn", "drise")]
    assert drise["images"] >= 1 and drise["seconds_per_pass"] > 0
    assert ("tiny_cnn", "drise") not in rates


def test_drise_runs_as_a_job_with_progress(server, astronaut):
    files = [("image", ("a.png", astronaut, "image/png"))]
    r = httpx.post(f"{server}/v1/jobs", files=files, data={"model": "mtcnn", "method": "drise",
                                                          "n_masks": "64"}, timeout=60)
    assert r.status_code == 202, r.text
    view = wait(server, r.json()["id"])
    assert view["status"] == "succeeded", view
    assert view["progress"] == {"done": 64, "total": 64}
    assert len(view["result"]["results"][0]["detections"]) == 1


@pytest.fixture(scope="module")
def frcnn_server(tmp_path_factory):
    """An operator's torchvision detector (random weights, seeded, saved as its card's state dict), its own
    score threshold at 0 so that untrained heads still give boxes."""
    from safetensors.torch import save_file

    from service.detection.torchvision_detectors import build_detector, set_thresholds

    models = tmp_path_factory.mktemp("detectors")
    torch.manual_seed(0)
    module = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
    (models / "weights").mkdir()
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(models / "weights" / "f.safetensors"))
    (models / "frcnn.toml").write_text('name = "frcnn"\narchitecture = "torchvision:fasterrcnn_mobilenet_v3_'
                                       'large_320_fpn"\ntask = "detection"\nnum_classes = 91\n[weights]\n'
                                       'path = "weights/f.safetensors"\n')
    registry = ModelRegistry.from_dir([MODELS, models], torch.device("cpu"), only={"frcnn", "tiny_cnn"})
    assert "frcnn" in registry.detectors, registry.unavailable
    set_thresholds(registry.detectors["frcnn"].module, 0.0, 5)
    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _):
        yield base


@pytest.mark.parametrize("method", ["gradcam", "drise"])
def test_a_torchvision_detector_answers_a_map_per_detection(frcnn_server, method):
    image = png((np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8))
    fields = {"model": "frcnn", "score_threshold": "0", "max_detections": "3"}
    if method == "drise":
        fields["n_masks"] = "16"
    r = httpx.post(f"{frcnn_server}/v1/explain/{method}", files=[("image", ("x.png", image, "image/png"))],
                   data=fields, timeout=300)
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert (result["width"], result["height"]) == (160, 120) and 1 <= len(result["detections"]) <= 3
    for found in result["detections"]:
        x1, y1, x2, y2 = found["box"]
        assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120
        heat = decode_npy(pybase64.b64decode(found["map"]["npy"]))
        assert heat.shape == (120, 160) and np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1
        if method == "gradcam":
            assert found["diagnostics"]["matched"] and found["diagnostics"]["layer"] == "backbone.body.16"


def test_an_answer_past_the_response_budget_or_a_costly_request_is_refused_before_any_work(astronaut):
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"mtcnn", "tiny_cnn"})
    settings = Settings(default_model="tiny_cnn", max_response_bytes=2_000_000, max_request_cost=500)
    with running_server(settings, registry) as (base, _):
        r = post(base, astronaut, n_masks=16)  # 20 maps of 512 x 512 float32 could take 28 MB
        assert r.status_code == 413 and r.json()["error"]["code"] == "response_too_large", r.text
        message = r.json()["error"]["message"]
        assert "the limit is 2.0 MB" in message and "max_detections=1" in message
        assert post(base, astronaut, n_masks=16, max_detections=1).status_code == 200
        r = post(base, astronaut, n_masks=600, max_detections=1)
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_costly"
        assert "costs 600 detector forwards" in r.json()["error"]["message"]
        r = post(base, b"not an image", n_masks=16, max_detections=1)
        assert r.status_code == 422 and "image 0" in r.json()["error"]["message"], r.text
