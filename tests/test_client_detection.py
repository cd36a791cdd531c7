"""The Python client and the `saliency` command line with a detection model (issue 27, item 5): MTCNN's D-RISE
on skimage's astronaut through a real server. Oracles: the typed answer holds exactly what the wire body
holds (D-RISE is seeded, so the same request gives the same map), the face's box is the astronaut's face, and
its map peaks inside the box; a classifier's answer is unchanged."""
from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pybase64
import pytest
from PIL import Image

from saliency_client import (
    AsyncClient,
    Client,
    Detection,
    DetectionExplanation,
    Explanation,
    ImageDetections,
    salient_region_in_box,
)
from saliency_client.cli import main
from saliency_client.schemas import ExplainResponse
from service.imaging import decode_npy

pytest.importorskip("facenet_pytorch", reason="facenet-pytorch: make venv installs it (--no-deps)")
data = pytest.importorskip("skimage.data")

N_MASKS = 32  # enough for the map to peak on the face (test_detection_api.py uses 300); seconds on a CPU


@pytest.fixture(scope="module")
def server(detector_server):
    return detector_server


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def answer(server, astronaut) -> DetectionExplanation:
    with Client(server, timeout=300) as c:
        result = c.explain(astronaut, "drise", model="mtcnn", outputs=["npy", "png", "overlay"],
                           n_masks=N_MASKS)
    assert isinstance(result, DetectionExplanation)
    return result


def test_a_detectors_answer_is_typed_per_detection(answer):
    assert (answer.task, answer.model, answer.method, len(answer)) == ("detection", "mtcnn", "drise", 1)
    assert answer.params["n_masks"] == N_MASKS
    [image] = answer
    assert isinstance(image, ImageDetections) and (image.width, image.height) == (512, 512)
    assert image.timing_ms is not None and image.timing_ms.compute > 0
    [face] = image
    assert isinstance(face, Detection) and image[0] is face
    assert face.label == "face" and face.label_index == 0 and face.score > 0.99
    x1, y1, x2, y2 = face.box
    assert 170 < x1 < x2 < 280 and 50 < y1 < y2 < 190  # the astronaut's face, in pixels of the upload
    assert face.map is not None and face.map.dtype == np.float32 and face.map.shape == (512, 512)
    assert (face.height, face.width) == (512, 512) and face.map.min() >= 0 and face.map.max() <= 1
    assert face.png is not None and face.png.mode == "L" and face.png.size == (512, 512)
    assert face.overlay is not None and face.overlay.size == (512, 512)
    assert face.diagnostics["n_masks"] == N_MASKS
    row, col = np.unravel_index(int(face.map.argmax()), face.map.shape)
    assert x1 <= col <= x2 and y1 <= row <= y2  # what keeps the face detected is the face
    region = salient_region_in_box(face.map, face.box)
    assert region.mask.any() and not region.mask[:, : int(x1)].any() and not region.mask[int(y2) + 1:].any()


def test_the_typed_answer_is_the_wire_body(server, astronaut, answer):
    r = httpx.post(f"{server}/v1/explain/drise", files=[("image", ("a.png", astronaut, "image/png"))],
                   data={"model": "mtcnn", "n_masks": str(N_MASKS)}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    wire = ExplainResponse.model_validate(body)  # the client's wire model takes the server's body as it is
    assert wire.task == "detection" and wire.results[0].detections[0].label == "face"  # type: ignore[union-attr]
    [[face]] = [found["detections"] for found in body["results"]]
    assert list(answer[0][0].box) == face["box"] and answer[0][0].score == face["score"]
    np.testing.assert_array_equal(answer[0][0].map, decode_npy(pybase64.b64decode(face["map"]["npy"])))


def test_a_classifiers_answer_is_unchanged(server, astronaut):
    with Client(server) as c:
        result = c.explain(astronaut, "gradient", model="tiny_cnn")
        models = {m.name: m.task for m in c.models()}
    assert isinstance(result, Explanation) and result.task == "classification"
    assert result[0].map is not None and result[0].map.shape == (512, 512) and result[0].label
    assert models["mtcnn"] == "detection" and models["tiny_cnn"] == "classification"


def test_a_detection_job_and_the_async_client(server, astronaut):
    """submit + wait (the job's result is the same body) and AsyncClient.explain."""

    async def run():
        async with AsyncClient(server, timeout=300) as c:
            job = await c.submit(astronaut, "drise", model="mtcnn", n_masks=16)
            return await c.wait(job.id, timeout=300), await c.explain(astronaut, "drise", model="mtcnn",
                                                                       n_masks=16)

    waited, direct = asyncio.run(run())
    assert isinstance(waited, DetectionExplanation) and isinstance(direct, DetectionExplanation)
    assert waited[0][0].label == direct[0][0].label == "face"
    np.testing.assert_array_equal(waited[0][0].map, direct[0][0].map)


def test_the_cli_writes_a_map_per_detection(server, astronaut, tmp_path, monkeypatch, capsys):
    photo = tmp_path / "photo.png"
    photo.write_bytes(astronaut)
    monkeypatch.chdir(tmp_path)
    assert main(["--url", server, "explain", "--method", "drise", "--model", "mtcnn", "-p", "n_masks=16",
                 str(photo)]) == 0
    out = capsys.readouterr().out
    assert f"{photo}: 1 detection by mtcnn (drise), 512x512" in out
    assert "[0] face score=1.000 box=[181" in out and "-> photo_drise_0.png" in out
    gray = Image.open(tmp_path / "photo_drise_0.png")
    assert gray.mode == "L" and gray.size == (512, 512)

    assert main(["--url", server, "explain", "-m", "drise", "--model", "mtcnn", "-p", "n_masks=16", "--json",
                 "--npy", str(tmp_path / "{stem}_{index}.npy"), "--out", str(tmp_path / "boxes.png"),
                 str(photo)]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (line["index"], line["label"], line["model"]) == (0, "face", "mtcnn") and line["score"] > 0.99
    assert line["written"] == [str(tmp_path / "boxes_0.png"), str(tmp_path / "photo_0.npy")]
    with Client(server) as c:
        again = c.explain(photo, "drise", model="mtcnn", n_masks=16, outputs=["npy", "png"])
    assert isinstance(again, DetectionExplanation) and again[0][0].png is not None
    np.testing.assert_array_equal(np.load(tmp_path / "photo_0.npy"), again[0][0].map)
    assert line["box"] == list(again[0][0].box)
    assert Image.open(tmp_path / "boxes_0.png").mode == "RGB"
    # the grayscale PNG the CLI made from the float map is the service's own PNG of it
    np.testing.assert_array_equal(np.asarray(gray), np.asarray(again[0][0].png))


def test_openapi_documents_the_detection_answer(server):
    schema = httpx.get(f"{server}/openapi.json").json()
    components = schema["components"]["schemas"]
    results = components["ExplainResponse"]["properties"]["results"]
    refs = {item["items"]["$ref"] for item in results["anyOf"]}
    assert refs == {"#/components/schemas/ImageResult", "#/components/schemas/DetectionImageResult"}
    assert components["ExplainResponse"]["properties"]["task"]["enum"] == ["classification", "detection"]
    detection = components["DetectionOut"]
    assert set(detection["required"]) == {"box", "label", "label_index", "score", "map"}
