"""CVAT: the cvat-sdk detection function and the nuclio handler, on a real server, checked with cvat-sdk's own
types, validator and mask decoder (no CVAT server needed)."""
from __future__ import annotations

import base64
import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from cvat_sdk import models
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
from cvat_sdk.masks import decode_mask

from saliency_client import Client, salient_region
from saliency_cvat import function, nuclio_handler
from saliency_cvat.shapes import outline_polygon
from service.settings import Settings
from tests.server import running_server


@pytest.fixture(scope="module")
def server(registry):
    with running_server(Settings(max_wait_ms=5), registry) as (base, _):
        yield base


@pytest.fixture(scope="module")
def expected(server, chelsea):
    with Client(server) as c:
        return salient_region(c.explain(chelsea)[0].map, 0.5)


def dataset_labels(mask_type: str = "any"):
    return [models.Label(id=10, name="salient", type=mask_type, attributes=[], sublabels=[]),
            models.Label(id=11, name="salient region", type="rectangle", attributes=[], sublabels=[])]


def test_sdk_function_returns_mask_and_box(server, chelsea, expected):
    fn = function.create(url=server, method="gradcam", threshold=0.5)
    shapes = fn.detect(_DetectionFunctionContextImpl(frame_name="chelsea.png"), chelsea)
    mapper = _AnnotationMapper(logging.getLogger("test"), fn.spec.labels, dataset_labels("mask"),
                               allow_unmatched_labels=False, conv_mask_to_poly=False)
    _, remapped = mapper.validate_and_remap(shapes, ds_frame=3)  # raises BadFunctionError on a bad shape
    mask, box = remapped
    assert (mask.type.value, mask.label_id, mask.frame, box.type.value, box.label_id) == ("mask", 10, 3,
                                                                                          "rectangle", 11)
    decoded = decode_mask(mask.points, image_width=451, image_height=300)
    np.testing.assert_array_equal(decoded, expected.mask)
    assert box.points == list(expected.box) and expected.mask.sum() > 1000


def test_sdk_function_honours_conv_mask_to_poly_and_confidence(server, chelsea, expected):
    fn = function.create(url=server)
    shapes = fn.detect(_DetectionFunctionContextImpl(frame_name="x", conv_mask_to_poly=True), chelsea)
    mapper = _AnnotationMapper(logging.getLogger("test"), fn.spec.labels, dataset_labels(),
                               allow_unmatched_labels=False, conv_mask_to_poly=True)
    _, (polygon, _) = mapper.validate_and_remap(shapes, ds_frame=0)
    xs, ys = polygon.points[0::2], polygon.points[1::2]
    x1, y1, x2, y2 = expected.box
    assert polygon.type.value == "polygon" and (min(xs), min(ys), max(xs), max(ys)) == (x1, y1, x2, y2)
    assert fn.detect(_DetectionFunctionContextImpl(frame_name="x", conf_threshold=0.99), chelsea) == []


def test_outline_polygon_traces_a_row_convex_region():
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True
    assert outline_polygon(mask, max_bands=2) == [3, 2, 3, 4, 3, 4, 3, 6, 9, 6, 9, 4, 9, 4, 9, 2]
    mask[7, 0] = mask[4, 11] = True  # a detached pixel and a bump: the bands widen to cover them
    xs = outline_polygon(mask)[0::2]
    assert (min(xs), max(xs)) == (0, 12)


def test_nuclio_handler(server, chelsea, expected, monkeypatch):
    monkeypatch.setenv("SALIENCY_URL", server)
    context = SimpleNamespace(user_data=SimpleNamespace(), Response=lambda **kw: SimpleNamespace(**kw))
    nuclio_handler.init_context(context)
    buf = io.BytesIO()
    chelsea.save(buf, "PNG")
    event = SimpleNamespace(body=json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode())
    response = nuclio_handler.handler(context, event)
    assert response.status_code == 200 and response.content_type == "application/json"
    mask, box = json.loads(response.body)
    assert (mask["label"], mask["type"], box["label"], box["type"]) == ("salient", "mask", "salient region",
                                                                        "rectangle")
    *pixels, xtl, ytl, xbr, ybr = mask["mask"]
    assert len(pixels) == (xbr - xtl + 1) * (ybr - ytl + 1) and set(pixels) <= {0, 255}
    crop = np.asarray(pixels, np.uint8).reshape(ybr - ytl + 1, xbr - xtl + 1) == 255
    np.testing.assert_array_equal(crop, expected.mask[ytl:ybr + 1, xtl:xbr + 1])
    assert box["points"] == list(expected.box) and 0 < float(box["confidence"]) <= 1
    assert len(mask["points"]) % 2 == 0 and len(mask["points"]) >= 6
    event.body = {"image": event.body and json.loads(event.body)["image"], "threshold": 0.99}
    assert json.loads(nuclio_handler.handler(context, event).body) == []
