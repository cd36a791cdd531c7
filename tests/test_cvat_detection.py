"""CVAT with a detection model (issue 27, item 5): MTCNN's D-RISE on skimage's astronaut through a real
server. The cvat-sdk function and the nuclio handler return per face its box (rectangle) and the salient
region of its map within the box (mask), both labelled `face`; checked with cvat-sdk's own validator and mask
decoder, and against the service's map of the same request (D-RISE is seeded)."""
from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from cvat_sdk import models
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
from cvat_sdk.masks import decode_mask
from PIL import Image

from saliency_client import Client, DetectionExplanation, salient_region_in_box
from saliency_cvat import function, nuclio_handler

pytest.importorskip("facenet_pytorch", reason="facenet-pytorch: make venv installs it (--no-deps)")
data = pytest.importorskip("skimage.data")

N_MASKS = 16  # the shapes are compared with the service's own map of the same request, not judged by quality
FUNCTION_YAML = Path(__file__).resolve().parents[1] / "clients" / "cvat" / "nuclio" / "function-mtcnn.yaml"


@pytest.fixture(scope="module")
def server(detector_server):
    return detector_server


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def face(server, astronaut):
    """The service's own answer: the face's detection with its map."""
    with Client(server, timeout=300) as c:
        answer = c.explain(astronaut, "drise", model="mtcnn", n_masks=N_MASKS)
    assert isinstance(answer, DetectionExplanation)
    [found] = answer[0]
    x1, y1, x2, y2 = found.box
    assert found.label == "face" and 170 < x1 < x2 < 280 and 50 < y1 < y2 < 190
    return found


def mapper(fn, conv_mask_to_poly=False):
    """cvat-sdk's check of a function's shapes against a task whose `face` label takes any shape."""
    labels = [models.Label(id=10, name="face", type="any", attributes=[], sublabels=[])]
    return _AnnotationMapper(logging.getLogger("test"), fn.spec.labels, labels, allow_unmatched_labels=False,
                             conv_mask_to_poly=conv_mask_to_poly)


def test_sdk_function_returns_each_faces_box_and_its_salient_mask(server, astronaut, face):
    fn = function.create(url=server, method="drise", model="mtcnn", labels="face", n_masks=N_MASKS)
    assert [(label.name, label.id) for label in fn.spec.labels] == [("face", 0)]
    shapes = fn.detect(_DetectionFunctionContextImpl(frame_name="astronaut.png"), astronaut)
    _, (box, mask) = mapper(fn).validate_and_remap(shapes, ds_frame=2)  # raises BadFunctionError if bad
    assert (box.type.value, box.label_id, mask.type.value, mask.label_id) == ("rectangle", 10, "mask", 10)
    assert box.points == pytest.approx(list(face.box))  # the face's box as the service gives it
    decoded = decode_mask(mask.points, image_width=512, image_height=512)
    expected = salient_region_in_box(face.map, face.box).mask
    np.testing.assert_array_equal(decoded, expected)
    x1, y1, x2, y2 = face.box
    rows, cols = np.nonzero(decoded)
    assert decoded.sum() > 100 and x1 - 1 <= cols.min() and cols.max() <= x2 and y1 - 1 <= rows.min()
    assert rows.max() <= y2  # the mask of a `face` is on the face


def test_sdk_function_polygons_confidence_and_labels(server, astronaut, face):
    fn = function.create(url=server, method="drise", model="mtcnn", labels="face", n_masks=N_MASKS)
    shapes = fn.detect(_DetectionFunctionContextImpl(frame_name="x", conv_mask_to_poly=True), astronaut)
    _, (_, polygon) = mapper(fn, conv_mask_to_poly=True).validate_and_remap(shapes, ds_frame=0)
    xs, ys = polygon.points[0::2], polygon.points[1::2]
    x1, y1, x2, y2 = salient_region_in_box(face.map, face.box).box
    assert polygon.type.value == "polygon" and (min(xs), min(ys), max(xs), max(ys)) == (x1, y1, x2, y2)
    # a confidence floor above the face's score leaves nothing
    assert fn.detect(_DetectionFunctionContextImpl(frame_name="x", conf_threshold=1.0), astronaut) == []
    # a spec without the detector's labels could not carry its shapes: said, not guessed
    with pytest.raises(ValueError, match="name its labels"):
        function.create(url=server, method="drise", model="mtcnn", n_masks=N_MASKS).detect(
            _DetectionFunctionContextImpl(frame_name="x"), astronaut)


def test_nuclio_handler_and_its_function_yaml(server, astronaut, face, monkeypatch):
    config = yaml.safe_load(FUNCTION_YAML.read_text())
    spec = json.loads(config["metadata"]["annotations"]["spec"])
    env = {e["name"]: e["value"] for e in config["spec"]["env"]}
    assert config["metadata"]["annotations"]["type"] == "detector" and spec == [{"id": 0, "name": "face"}]
    assert (env["SALIENCY_MODEL"], env["SALIENCY_METHOD"]) == ("mtcnn", "drise")
    assert config["spec"]["handler"] == "saliency_cvat.nuclio_handler:handler"
    assert float(env["SALIENCY_TIMEOUT"]) < float(config["spec"]["eventTimeout"].rstrip("s"))

    env.update(SALIENCY_URL=server, SALIENCY_PARAMS=json.dumps({"n_masks": N_MASKS}))  # a small n: quick
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    context = SimpleNamespace(user_data=SimpleNamespace(), Response=lambda **kw: SimpleNamespace(**kw))
    nuclio_handler.init_context(context)
    buf = io.BytesIO()
    astronaut.save(buf, "PNG")
    event = SimpleNamespace(body=json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode())
    response = nuclio_handler.handler(context, event)
    assert response.status_code == 200 and response.content_type == "application/json"
    box, mask = json.loads(response.body)
    assert {box["label"], mask["label"]} <= {label["name"] for label in spec}  # CVAT matches labels by name
    assert (box["type"], mask["type"]) == ("rectangle", "mask")
    assert box["points"] == pytest.approx(list(face.box)) and float(box["confidence"]) > 0.99
    *pixels, xtl, ytl, xbr, ybr = mask["mask"]
    assert len(pixels) == (xbr - xtl + 1) * (ybr - ytl + 1) and set(pixels) <= {0, 255}
    expected = salient_region_in_box(face.map, face.box).mask
    crop = np.asarray(pixels, np.uint8).reshape(ybr - ytl + 1, xbr - xtl + 1) == 255
    np.testing.assert_array_equal(crop, expected[ytl:ybr + 1, xtl:xbr + 1])
    assert crop.sum() == expected.sum() and len(mask["points"]) % 2 == 0 and len(mask["points"]) >= 6
    event.body = {"image": base64.b64encode(buf.getvalue()).decode(), "threshold": 1.0}
    assert json.loads(nuclio_handler.handler(context, event).body) == []
