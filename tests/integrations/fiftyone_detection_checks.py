"""The FiftyOne helper with a detection model; run by tests/test_fiftyone_detection.py under .venv/tools
(fiftyone; its database cannot run here, so on in-memory samples with FiftyOne's own label validation).

SALIENCY_URL names a real saliency server serving `mtcnn`; IMAGES_DIR holds astronaut.png; N_MASKS the D-RISE
masks to ask for (few: the fields are compared with the service's own answer to the same request, which
D-RISE's seed makes the same).
"""
from __future__ import annotations

import os
from pathlib import Path

import fiftyone as fo
import numpy as np
import pytest

from saliency_client import Client, DetectionExplanation, salient_region_in_box
from saliency_fiftyone import add_saliency, to_detections

ASTRONAUT = Path(os.environ.get("IMAGES_DIR", ".")) / "astronaut.png"
N_MASKS = int(os.environ.get("N_MASKS", "16"))


@pytest.fixture(scope="module")
def client():
    with Client(os.environ["SALIENCY_URL"], timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def sample(client):
    [sample] = samples = [fo.Sample(filepath=str(ASTRONAUT))]
    assert add_saliency(samples, client, field="drise", method="drise", model="mtcnn", n_masks=N_MASKS) == 1
    return sample


@pytest.fixture(scope="module")
def direct(client):
    """The service's own answer at the input size (add_saliency's default size)."""
    answer = client.explain(ASTRONAUT, "drise", model="mtcnn", size="input", n_masks=N_MASKS)
    assert isinstance(answer, DetectionExplanation)
    return answer[0]


def test_detections_with_relative_boxes_and_the_detectors_scores(sample, direct):
    detections = sample["drise"]
    assert isinstance(detections, fo.Detections)
    [face] = detections.detections
    [expected] = direct
    x1, y1, x2, y2 = expected.box
    assert face.label == "face" and face.confidence == expected.score > 0.99
    assert face.bounding_box == pytest.approx([x1 / 512, y1 / 512, (x2 - x1) / 512, (y2 - y1) / 512])
    x, y, w, h = face.bounding_box
    assert 0.33 < x < x + w < 0.55 and 0.1 < y < y + h < 0.37  # the astronaut's face (x 170-280, y 50-190 px)


def test_each_detection_has_its_heatmap_field_and_an_in_box_mask(sample, direct):
    [face] = sample["drise"].detections
    [expected] = direct
    assert face["heatmap_field"] == "drise_map0"
    heat = sample["drise_map0"]
    assert isinstance(heat, fo.Heatmap) and heat.range == [0.0, 1.0]
    np.testing.assert_array_equal(heat.map, expected.map)  # the float map itself, lossless
    assert heat.map.shape == (512, 512)  # the astronaut is under the detector's 640 px: explained as is
    region = salient_region_in_box(expected.map, expected.box)
    x1, y1, x2, y2 = expected.box
    crop = region.mask[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))]
    assert face.mask.dtype == bool and face.mask.shape == crop.shape
    np.testing.assert_array_equal(face.mask, crop)
    assert crop.sum() == region.mask.sum() > 100  # the region lies in the box
    # the map of the face box is heavier inside the box than outside
    inside = expected.map[round(y1):round(y2), round(x1):round(x2)]
    assert inside.mean() > 1.2 * (expected.map.sum() - inside.sum()) / (expected.map.size - inside.size)


def test_labels_serialise_like_fiftyone_stores_them(direct):
    detections, heatmaps = to_detections(direct, field="faces")
    back = fo.Detections.from_dict(detections.to_dict())
    [face] = back.detections
    assert face.label == "face" and face["heatmap_field"] == "faces_map0" and list(heatmaps) == ["faces_map0"]
    np.testing.assert_array_equal(face.mask, detections.detections[0].mask)
    np.testing.assert_array_equal(fo.Heatmap.from_dict(heatmaps["faces_map0"].to_dict()).map, direct[0].map)


def test_metrics_are_refused_for_a_detector(client):
    with pytest.raises(ValueError, match="detector"):
        add_saliency([fo.Sample(filepath=str(ASTRONAUT))], client, method="drise", model="mtcnn",
                     metrics=True, n_masks=16)
