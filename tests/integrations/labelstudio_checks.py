"""The Label Studio backend's own checks; run by tests/test_labelstudio.py under .venv/tools
(label-studio-sdk).

SALIENCY_URL names a real saliency server that the outer test started; SALIENCY_SMALL_URL one whose answers
are bounded at 40 KB and whose requests at one image's metrics; PLANTED a JSON file of the service's own
curves of maps of a planted model (tests/test_labelstudio.py, planted_metrics); CHELSEA a photo.
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from PIL import Image
from starlette.testclient import TestClient

from saliency_client import Client, ValidationError
from saliency_labelstudio import BackendSettings, create_app
from saliency_labelstudio.faithfulness import describe, faithfulness_score, game_gains
from saliency_labelstudio.fetch import FetchError, ImageFetcher
from saliency_labelstudio.predict import ConfigError, Control, Targets, brush_region
from saliency_labelstudio.settings import SettingsError

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
                                          ({"score_by": "confidence"}, "score_by"),
                                          ({"score_by": 1}, "score_by"),
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
    """`saliency-<method>-<model>` (docs/labeling-tools.md): the model configured, else the service's default
    model."""
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


# --- scoring by faithfulness -------------------------------------------------------------------------------

def auc(curve) -> float:
    """The service's trapezoid AUC over x in [0, 1]."""
    return (sum(curve) - curve[0] / 2 - curve[-1] / 2) / (len(curve) - 1)


def metrics_of(deletion, insertion, deletion_random, insertion_random) -> dict:
    """A result's `metrics` from four curves (their AUCs as the service computes them)."""
    curves = {"deletion_curve": deletion, "insertion_curve": insertion,
              "deletion_curve_random": deletion_random, "insertion_curve_random": insertion_random}
    return {**curves, **{name.replace("_curve", "_auc"): auc(c) for name, c in curves.items()},
            "steps": len(deletion) - 1, "replacement": "blur", "stability": None}


P0, P1, K = 0.9, 0.1, 10
LINEAR = list(np.linspace(P0, P1, K + 1))  # a random order: the evidence leaves evenly


def test_a_map_that_is_the_random_order_scores_zero():
    same = metrics_of(LINEAR, LINEAR[::-1], LINEAR, LINEAR[::-1])
    assert game_gains(same) == (0.0, 0.0) and faithfulness_score(same) == 0.0


def test_the_ideal_step_curves_score_one_and_overshoot_is_clipped():
    ideal = metrics_of([P0] + [P1] * K, [P1] + [P0] * K, LINEAR, LINEAR[::-1])
    assert game_gains(ideal) == pytest.approx((1.0, 1.0)) and faithfulness_score(ideal) == pytest.approx(1.0)
    beyond = metrics_of([P0] + [0.0] * (K - 1) + [P1], [P1] + [1.0] * (K - 1) + [P0], LINEAR, LINEAR[::-1])
    assert min(game_gains(beyond)) > 1 and faithfulness_score(beyond) == 1.0


def test_worse_than_random_scores_zero_not_below():
    inverted = metrics_of([P0] * K + [P1], [P1] * K + [P0], LINEAR, LINEAR[::-1])
    assert max(game_gains(inverted)) < 0 and faithfulness_score(inverted) == 0.0


def test_the_score_is_monotone_in_each_curve():
    """Lowering the deletion curve, or raising the insertion curve, never lowers the score, from the random
    order's 0 to the ideal's 1; the two games weigh the same."""
    def falling(t: float) -> list[float]:  # deletion: from the random order's curve (t = 0) to the ideal (1)
        return [P0] + [(1 - t) * p + t * P1 for p in LINEAR[1:-1]] + [P1]

    def rising(t: float) -> list[float]:  # insertion: likewise
        return [P1] + [(1 - t) * p + t * P0 for p in LINEAR[::-1][1:-1]] + [P0]

    ts = np.linspace(0, 1, 21)
    by_deletion = [faithfulness_score(metrics_of(falling(t), LINEAR[::-1], LINEAR, LINEAR[::-1])) for t in ts]
    by_insertion = [faithfulness_score(metrics_of(LINEAR, rising(t), LINEAR, LINEAR[::-1])) for t in ts]
    assert by_deletion[0] == 0 and by_deletion[-1] == pytest.approx(0.5)  # one game ideal, the other random
    assert np.all(np.diff(by_deletion) > 0) and by_insertion == pytest.approx(by_deletion)
    both = [faithfulness_score(metrics_of(falling(t), rising(t), LINEAR, LINEAR[::-1])) for t in ts]
    assert np.all(np.diff(both) > 0) and both[-1] == pytest.approx(1.0)


def test_games_that_cannot_tell_maps_apart():
    """A substitution that takes (almost) nothing from the class: no evidence either way, so 0. A game whose
    random curve is already ideal: left out, the other decides."""
    flat = [0.5] * (K + 1)
    assert faithfulness_score(metrics_of(flat, flat, flat, flat)) == 0.0
    barely = list(np.linspace(0.5, 0.47, K + 1))  # p0 - p1 = 6% of p0
    ideal_like = metrics_of([0.5] + [0.47] * K, [0.47] + [0.5] * K, barely, barely[::-1])
    assert game_gains(ideal_like) == (None, None) and faithfulness_score(ideal_like) == 0.0
    rising = metrics_of(LINEAR[::-1], LINEAR, LINEAR[::-1], LINEAR)  # the substrate is the class's evidence
    assert faithfulness_score(rising) == 0.0
    steep = [P0] + [P1] * K  # the random deletion curve falls at once: deletion has no room
    one_game = metrics_of(steep, [P1] + [P0] * K, steep, LINEAR[::-1])
    assert game_gains(one_game)[0] is None and faithfulness_score(one_game) == pytest.approx(1.0)


def test_scores_stay_in_the_unit_interval():
    rng = np.random.default_rng(0)
    for _ in range(500):
        k = int(rng.integers(2, 30))
        p0, p1 = rng.random(2)
        curves = [[p0, *rng.random(k - 1), p1] for _ in range(2)] + [[p1, *rng.random(k - 1), p0]
                                                                      for _ in range(2)]
        score = faithfulness_score(metrics_of(curves[0], curves[2], curves[1], curves[3]))
        assert 0.0 <= score <= 1.0


def planted() -> dict[str, list[dict]]:
    return json.loads(Path(os.environ["PLANTED"]).read_text())


def test_the_planted_models_true_map_scores_high_and_the_random_order_zero():
    """The service's own curves (outer test): on a model whose class is the mean of a patch a quarter of the
    image, the true map scores about (1 - 1/4) / (1 - 1/20) = 0.79; a map ordering the pixels exactly as the
    service's random order scores 0; a noise map is no better than a random order; the inverse scores 0."""
    found = planted()
    for name, scores in {name: [faithfulness_score(m) for m in found[name]] for name in found}.items():
        print(name, [round(s, 3) for s in scores])
    for b in range(3):
        assert faithfulness_score(found["true"][b]) == pytest.approx(0.79, abs=0.03)
        assert faithfulness_score(found["random_order"][b]) == 0.0
        assert game_gains(found["random_order"][b]) == (0.0, 0.0)
        assert faithfulness_score(found["noise"][b]) < 0.1
        assert faithfulness_score(found["inverted"][b]) == 0.0
        assert faithfulness_score(found["true_blur"][b]) == 0.0  # blur keeps the patch's mean: no evidence


def test_the_score_by_setting():
    assert BackendSettings.from_env({}).score_by == "probability"
    assert BackendSettings.from_env({"SALIENCY_SCORE_BY": "faithfulness"}).score_by == "faithfulness"
    with pytest.raises(SettingsError, match="score_by"):
        BackendSettings.from_env({"SALIENCY_SCORE_BY": "accuracy"})
    settings = BackendSettings().for_project({"score_by": "faithfulness"})
    assert settings.score_by == "faithfulness"


def chelsea_url() -> str:
    return "data:image/png;base64," + base64.b64encode(Path(os.environ["CHELSEA"]).read_bytes()).decode()


def test_predictions_scored_by_faithfulness(app):
    """score_by=faithfulness (a project's extra param here): the prediction's and each region's score is the
    faithfulness score of the service's own metrics for the map, whose figures are in each region's meta
    text; the map itself is the one a probability-scored prediction carries."""
    app.post("/setup", json={"project": "11.1", "schema": BOTH, "extra_params": {"score_by": "faithfulness"}})
    tasks = [{"id": 1, "data": {"photo": chelsea_url()}}]
    [faithful] = app.post("/predict", json={"tasks": tasks, "project": "11.1",
                                            "label_config": BOTH}).json()["results"]
    [plain] = app.post("/predict", json={"tasks": tasks, "label_config": BOTH}).json()["results"]
    with Client(os.environ["SALIENCY_URL"]) as client:
        direct = client.explain(Path(os.environ["CHELSEA"]).read_bytes(), "gradcam",
                                outputs=["png", "metrics"])[0]
    score = faithfulness_score(direct.metrics)
    assert 0.0 < score < 1.0 and score != pytest.approx(direct.probability)
    assert faithful["score"] == pytest.approx(score) and plain["score"] == pytest.approx(direct.probability)
    assert faithful["model_version"] == plain["model_version"] == "saliency-gradcam-efficientnet_lite0"
    for region, plain_region in zip(faithful["result"], plain["result"], strict=True):
        assert region["score"] == pytest.approx(score)
        assert plain_region["score"] == pytest.approx(direct.probability) and "meta" not in plain_region
        [text] = region["meta"]["text"]
        assert text == describe(direct.metrics, score, direct.label, direct.probability)
        assert text.startswith(f"faithfulness {score:.2f}: deletion AUC ") and "Egyptian cat" in text
        assert region["value"] == plain_region["value"]  # the same brush levels and box


def test_faithfulness_batches_are_split_when_too_costly_or_too_large():
    """On the small server a request's cost fits one image's metrics (two are a 422 too_costly) and a 160x120
    photo's PNG map with its metrics is over the 40 KB answer bound (its map comes at the model input): every
    task still gets its prediction, at its photo's size, scored by the faithfulness of its own map."""
    settings = BackendSettings(saliency_url=os.environ["SALIENCY_SMALL_URL"], method="gradient",
                               model="tiny_cnn", score_by="faithfulness")
    shapes = [(120, 160)] * 4 + [(48, 80)]
    tasks = [{"id": i, "data": {"photo": png_data_url(i, shape)}} for i, shape in enumerate(shapes)]
    photos = [base64.b64decode(t["data"]["photo"].split(",")[1]) for t in tasks]
    with Client(os.environ["SALIENCY_SMALL_URL"]) as client:
        with pytest.raises(ValidationError) as refused:  # what the backend's first request meets
            client.explain(photos[:2], "gradient", model="tiny_cnn", outputs=["png", "metrics"])
        assert refused.value.code == "too_costly"
        direct = [client.explain(photo, "gradient", model="tiny_cnn", outputs=["metrics"], size="input")[0]
                  for photo in photos]
    with TestClient(create_app(settings)) as small:
        answer = small.post("/predict", json={"tasks": tasks, "label_config": BOTH})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 5
    for (height, width), prediction, alone in zip(shapes, results, direct, strict=True):
        assert prediction["score"] == pytest.approx(faithfulness_score(alone.metrics))
        brush_result, box = prediction["result"]
        assert (brush_result["original_width"], brush_result["original_height"]) == (width, height)
        assert brush_result["meta"]["text"][0].startswith("faithfulness ")
