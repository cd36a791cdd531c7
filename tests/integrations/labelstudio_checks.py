"""The Label Studio backend's own checks; run by tests/test_labelstudio.py under .venv/tools
(label-studio-sdk).

SALIENCY_URL names a real saliency server that the outer test started.
"""
from __future__ import annotations

import base64
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from PIL import Image
from starlette.testclient import TestClient

from saliency_client import Client
from saliency_labelstudio import BackendSettings, create_app
from saliency_labelstudio.fetch import FetchError, ImageFetcher
from saliency_labelstudio.predict import ConfigError, Control, Targets, brush_region

BOTH = """<View><Image name="img" value="$photo"/>
<BrushLabels name="sal" toName="img"><Label value="Other"/><Label value="Salient"/></BrushLabels>
<RectangleLabels name="box" toName="img"><Label value="Salient"/></RectangleLabels></View>"""
BRUSH_ONLY = ('<View><Image name="i" value="$image"/>'
              '<BrushLabels name="b" toName="i"><Label value="S"/></BrushLabels></View>')
NEITHER = ('<View><Image name="i" value="$image"/>'
           '<Choices name="c" toName="i"><Choice value="x"/></Choices></View>')


def png_data_url(seed: int, shape: tuple[int, int] = (48, 80)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3),
                                                         dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_targets_follow_the_label_config():
    t = Targets.from_config(BOTH, label="Salient")
    assert t.data_key == "photo" and t.brush == Control("sal", "img", "Salient") and t.box.from_name == "box"
    assert Targets.from_config(BOTH).brush.label == "Other"  # no preference: the first label
    only = Targets.from_config(BRUSH_ONLY)
    assert only.box is None and only.brush.from_name == "b"
    with pytest.raises(ConfigError):
        Targets.from_config(NEITHER)


def test_brush_region_decodes_to_the_map_levels():
    heat = np.linspace(0, 1, 37 * 53, dtype=np.float32).reshape(37, 53)
    region = brush_region(Control("sal", "img", "Salient"), heat, 0.9)
    assert (region["original_width"], region["original_height"]) == (53, 37)
    rgba = np.asarray(brush.decode_rle(region["value"]["rle"]), np.uint8).reshape(37, 53, 4)
    np.testing.assert_array_equal(rgba[..., 3], np.round(heat * 255).astype(np.uint8))


class Recorder(BaseHTTPRequestHandler):
    """A loopback HTTP host that serves bytes and records the Authorization header of each request."""

    seen: list

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") in (None, "Token legacy-key", "Bearer access-1"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"image-bytes")
        else:
            self.send_response(401)
            self.end_headers()

    def do_POST(self):  # noqa: N802
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        self.seen.append((self.path, body.decode()))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"access": "access-1"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def hosts():
    servers = []
    for _ in range(2):
        handler = type("H", (Recorder,), {"seen": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [(f"http://127.0.0.1:{s.server_address[1]}", s.RequestHandlerClass.seen) for s in servers]
    for s in servers:
        s.shutdown()


def test_the_token_goes_to_label_studio_only(hosts):
    (ls, ls_seen), (other, other_seen) = hosts
    fetcher = ImageFetcher(ls, "legacy-key")
    assert fetcher.fetch("/data/upload/1/cat.png") == b"image-bytes"
    assert fetcher.fetch(f"{ls}/data/local-files/?d=cat.png") == b"image-bytes"
    assert fetcher.fetch(f"{other}/cat.png") == b"image-bytes"
    assert ls_seen == [("/data/upload/1/cat.png", "Token legacy-key"), ("/data/local-files/?d=cat.png",
                                                                        "Token legacy-key")]
    assert other_seen == [("/cat.png", None)]
    assert fetcher.fetch(png_data_url(0)).startswith(b"\x89PNG")
    with pytest.raises(FetchError):
        fetcher.fetch("ftp://example.org/cat.png")
    with pytest.raises(FetchError):
        ImageFetcher(None, None).fetch("/data/upload/1/cat.png")


def test_a_personal_access_token_is_traded_for_an_access_token(hosts):
    (ls, seen), _ = hosts
    pat = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln"
    fetcher = ImageFetcher(ls, pat)
    assert fetcher.fetch("/data/upload/1/cat.png") == b"image-bytes"
    assert seen[0] == ("/api/token/refresh/", f'{{"refresh":"{pat}"}}')
    assert seen[1] == ("/data/upload/1/cat.png", "Bearer access-1")


@pytest.fixture
def app():
    settings = BackendSettings(saliency_url=os.environ["SALIENCY_URL"], basic_auth=("ls", "secret"))
    with TestClient(create_app(settings)) as client:
        client.auth = ("ls", "secret")
        yield client


def test_protocol_routes(app):
    assert app.get("/health").json()["status"] == "UP"
    assert app.get("/health", auth=("ls", "wrong")).status_code == 401
    setup = app.post("/setup", json={"project": "7.1700000000", "schema": BOTH,
                                     "extra_params": {"method": "gradient", "threshold": "0.3"}})
    assert setup.json() == {"model_version": "saliency-gradient-efficientnet_lite0"}  # the service's default
    assert app.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 201
    assert app.post("/webhook", json={"action": "PROJECT_UPDATED"}).json() == {"status": "Unknown event"}
    assert app.post("/predict", json={"tasks": [], "label_config": NEITHER}).status_code == 400


@pytest.mark.parametrize("extra, named", [({"threshold": "abc"}, "threshold"),
                                          ({"threshold": 2}, "threshold"),
                                          ({"threshold": 0}, "threshold"),  # salient_region needs (0, 1]
                                          ({"params": '{"layer": "bn2"}'}, "params"),
                                          ({"method": 3}, "method"),
                                          ("gradcam", "extra_params")])
def test_setup_refuses_extra_params_it_cannot_use(app, extra, named):
    answer = app.post("/setup", json={"project": "8.1", "schema": BOTH, "extra_params": extra})
    assert answer.status_code == 400 and named in answer.json()["error"]
    assert app.post("/setup", json={"project": "8.1", "schema": BOTH}).status_code == 200  # still up


def test_predict_gives_one_prediction_per_task(app):
    app.post("/setup", json={"project": "7.1", "schema": BOTH, "extra_params": {"method": "gradient"}})
    tasks = [{"id": i, "data": {"photo": png_data_url(i)}} for i in range(3)]
    body = app.post("/predict", json={"tasks": tasks, "project": "7.1", "label_config": BOTH}).json()
    assert len(body["results"]) == 3
    for prediction in body["results"]:
        assert prediction["model_version"] == "saliency-gradient-efficientnet_lite0"
        assert 0 < prediction["score"] <= 1
        brush_result, box = prediction["result"]
        assert brush_result["type"] == "brushlabels" and brush_result["original_width"] == 80
        assert box["type"] == "rectanglelabels" and 0 < box["value"]["width"] <= 100
    bad = app.post("/predict", json={"tasks": [{"id": 1, "data": {"photo": "data:image/png;base64,!!"}}],
                                     "project": "7.1", "label_config": BOTH})
    assert bad.status_code == 502 and "base64" in bad.json()["error"]


def test_predict_fits_batches_to_the_services_answer_bound():
    """The small server answers at most 40 KB: a 160x120 photo's PNG map fits (~31 KB bound), two do not, and
    its float32 npy map (~106 KB) never did; a 640x480 photo's PNG map (~416 KB) does not fit alone, its map
    at the model input (~10 KB) does. Every task still gets its prediction, at its photo's size."""
    settings = BackendSettings(saliency_url=os.environ["SALIENCY_SMALL_URL"], method="gradient",
                               model="tiny_cnn")
    shapes = [(120, 160)] * 4 + [(480, 640)]
    tasks = [{"id": i, "data": {"photo": png_data_url(i, shape)}} for i, shape in enumerate(shapes)]
    with TestClient(create_app(settings)) as small:
        answer = small.post("/predict", json={"tasks": tasks, "label_config": BOTH})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 5
    for (height, width), prediction in zip(shapes, results, strict=True):
        assert prediction["model_version"] == "saliency-gradient-tiny_cnn" and 0 < prediction["score"] <= 1
        brush_result, box = prediction["result"]
        assert (brush_result["original_width"], brush_result["original_height"]) == (width, height)
        assert 0 < box["value"]["width"] <= 100 and 0 < box["value"]["height"] <= 100
    with Client(os.environ["SALIENCY_SMALL_URL"]) as client:  # one photo per request: its own PNG map
        direct = client.explain(base64.b64decode(tasks[0]["data"]["photo"].split(",")[1]), "gradient",
                                model="tiny_cnn", outputs=["png"])[0]
    rle = results[0]["result"][0]["value"]["rle"]
    rgba = np.asarray(brush.decode_rle(rle), np.uint8).reshape(120, 160, 4)
    np.testing.assert_array_equal(rgba[..., 3], np.asarray(direct.png.convert("L")))


def test_the_model_version_names_method_and_model(app):
    """`saliency-<method>-<model>` (README): the model configured, else the service's default model."""
    setup = app.post("/setup", json={"project": "9.1", "schema": BOTH,
                                     "extra_params": {"method": "gradient", "model": "tiny_cnn"}})
    assert setup.json() == {"model_version": "saliency-gradient-tiny_cnn"}
    tasks = [{"id": 1, "data": {"photo": png_data_url(0)}}]
    [prediction] = app.post("/predict", json={"tasks": tasks, "project": "9.1",
                                              "label_config": BOTH}).json()["results"]
    assert prediction["model_version"] == "saliency-gradient-tiny_cnn"
    [prediction] = app.post("/predict", json={"tasks": tasks, "label_config": BOTH}).json()["results"]
    assert prediction["model_version"] == "saliency-gradcam-efficientnet_lite0"  # the backend's own settings
    assert app.get("/versions").json()["versions"] == ["saliency-gradcam-efficientnet_lite0",
                                                       "saliency-gradient-tiny_cnn"]


def test_predict_answers_within_the_backend_timeout():
    """The timeout bounds the whole /predict (all its batches and any job the service turns one into)."""
    settings = BackendSettings(saliency_url=os.environ["SALIENCY_URL"], timeout=0.01)
    with TestClient(create_app(settings)) as hurried:
        tasks = [{"id": i, "data": {"photo": png_data_url(i)}} for i in range(2)]
        answer = hurried.post("/predict", json={"tasks": tasks, "label_config": BOTH})
    assert answer.status_code == 502 and "time" in answer.json()["error"]
