"""The Label Studio backend with a detection model; run by tests/test_labelstudio_detection.py under
.venv/tools (label-studio-sdk decodes the brushes).

SALIENCY_URL names a real saliency server serving `mtcnn`; ASTRONAUT a PNG of skimage's astronaut; N_MASKS the
D-RISE masks to ask for (few: the regions are compared with the service's own map of the same request, which
D-RISE's seed makes the same).
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from starlette.testclient import TestClient

from saliency_client import Client, DetectionExplanation
from saliency_labelstudio import BackendSettings, create_app
from saliency_labelstudio.predict import Control, Targets

FACES = """<View><Image name="img" value="$photo"/>
<RectangleLabels name="box" toName="img"><Label value="person"/><Label value="face"/></RectangleLabels>
<BrushLabels name="sal" toName="img"><Label value="Salient"/><Label value="face"/></BrushLabels></View>"""
N_MASKS = int(os.environ.get("N_MASKS", "16"))


@pytest.fixture(scope="module")
def photo() -> bytes:
    return Path(os.environ["ASTRONAUT"]).read_bytes()


@pytest.fixture(scope="module")
def expected(photo):
    """The service's own answer to the request the backend makes: the face with its 8-bit map."""
    with Client(os.environ["SALIENCY_URL"], timeout=300) as c:
        answer = c.explain(photo, "drise", model="mtcnn", outputs=["png"], n_masks=N_MASKS)
    assert isinstance(answer, DetectionExplanation)
    [face] = answer[0]
    return face


@pytest.fixture(scope="module")
def prediction(photo):
    settings = BackendSettings(saliency_url=os.environ["SALIENCY_URL"], method="drise", model="mtcnn",
                               params={"n_masks": N_MASKS})
    task = {"id": 1, "data": {"photo": "data:image/png;base64," + base64.b64encode(photo).decode()}}
    with TestClient(create_app(settings)) as app:
        answer = app.post("/predict", json={"tasks": [task], "label_config": FACES})
    assert answer.status_code == 200, answer.text
    [found] = answer.json()["results"]
    return found


def test_each_detection_is_a_box_and_a_brush_with_its_label(prediction, expected):
    assert prediction["model_version"] == "saliency-drise-mtcnn"
    assert prediction["score"] == pytest.approx(expected.score)  # the lowest detection score (one face)
    box, sal, relation = prediction["result"]
    assert (box["type"], sal["type"], relation["type"]) == ("rectanglelabels", "brushlabels", "relation")
    assert box["value"]["rectanglelabels"] == ["face"] and sal["value"]["brushlabels"] == ["face"]
    assert box["score"] == sal["score"] == pytest.approx(expected.score)
    assert (box["from_name"], sal["from_name"]) == ("box", "sal")
    assert box["to_name"] == sal["to_name"] == "img"
    for region in (box, sal):
        assert (region["original_width"], region["original_height"]) == (512, 512)
    # linked: the map's id is the box's with -map, and a relation runs from the box to its map
    assert sal["id"] == box["id"] + "-map" and box["id"].startswith("det0-")
    assert (relation["from_id"], relation["to_id"]) == (box["id"], sal["id"])
    assert box["meta"]["text"][0].startswith("detection 0: face score")


def test_the_rectangle_is_the_face_box_in_percent(prediction, expected):
    value = prediction["result"][0]["value"]
    x1, y1, x2, y2 = expected.box
    assert (value["x"], value["y"], value["width"], value["height"]) == pytest.approx(
        (100 * x1 / 512, 100 * y1 / 512, 100 * (x2 - x1) / 512, 100 * (y2 - y1) / 512))
    assert 33 < value["x"] < value["x"] + value["width"] < 55 and 10 < value["y"] < value["y"] + value[
        "height"] < 37  # the astronaut's face: x 170-280, y 50-190 of 512 pixels
    assert value["rotation"] == 0


def test_the_brush_is_the_detections_map(prediction, expected):
    rle = prediction["result"][1]["value"]["rle"]
    rgba = np.asarray(brush.decode_rle(rle), np.uint8).reshape(512, 512, 4)
    levels = np.asarray(expected.png.convert("L"))
    for channel in range(4):  # graded opacity in the label's colour, as the classifier's brush
        np.testing.assert_array_equal(rgba[..., channel], levels)
    # the map of the face box is heavier inside the box than outside, and peaks inside it
    x1, y1, x2, y2 = (round(v) for v in expected.box)
    alpha = rgba[..., 3].astype(np.float64)
    inside = alpha[y1:y2, x1:x2]
    outside_mean = (alpha.sum() - inside.sum()) / (alpha.size - inside.size)
    assert inside.mean() > 1.2 * outside_mean
    row, col = np.unravel_index(int(alpha.argmax()), alpha.shape)
    assert x1 <= col <= x2 and y1 <= row <= y2


def test_a_config_without_the_detectors_label_gets_its_first_label():
    only = ('<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i">'
            '<Label value="Object"/></RectangleLabels>'
            '<BrushLabels name="b" toName="i"><Label value="S"/></BrushLabels></View>')
    targets = Targets.from_config(only)
    assert targets.box == Control("r", "i", "Object") and targets.box.label_for("face") == "Object"
    assert Targets.from_config(FACES).box.label_for("face") == "face"


def test_a_brush_only_config_gets_brushes_and_no_relation(photo, expected):
    brush_only = ('<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i">'
                  '<Label value="face"/></BrushLabels></View>')
    settings = BackendSettings(saliency_url=os.environ["SALIENCY_URL"], method="drise", model="mtcnn",
                               params={"n_masks": N_MASKS})
    task = {"id": 1, "data": {"image": "data:image/png;base64," + base64.b64encode(photo).decode()}}
    with TestClient(create_app(settings)) as app:
        [found] = app.post("/predict", json={"tasks": [task], "label_config": brush_only}).json()["results"]
    [region] = found["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["face"]
