"""Detection models in the zoo (issue 27, item 1): the MTCNN face detector with the real weights
facenet-pytorch's wheel ships, loaded through the service's safe reader. Oracles: its detections equal
facenet-pytorch's own MTCNN on the same photo; on skimage's astronaut (one real face) it finds one face where
the face is. A detector is listed with `task: detection`, and a classifier method asked of it is a 422."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import service.detection.zoo  # noqa: F401  (registers the detectors' loader with the zoo)
from service.settings import Settings
from service.zoo import ModelRegistry
from service.zoo.cards import CardError, read_card
from tests.conftest import MODELS
from tests.server import running_server

facenet = pytest.importorskip("facenet_pytorch", reason="facenet-pytorch: make venv installs it (--no-deps)")
data = pytest.importorskip("skimage.data")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def mtcnn():
    return ModelRegistry.from_dir(MODELS, CPU, only={"mtcnn"}).detectors["mtcnn"]


def as_batch(*images: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.as_tensor(i).permute(2, 0, 1).float() / 255 for i in images])


def test_mtcnn_equals_facenet_pytorchs_own_on_the_astronaut(mtcnn, astronaut):
    [found] = mtcnn.detect(as_batch(astronaut))
    theirs, probs = facenet.MTCNN(keep_all=True, select_largest=False, device="cpu").detect(
        Image.fromarray(astronaut))
    assert len(found) == len(theirs) == 1
    np.testing.assert_allclose(found.boxes.numpy(), np.asarray(theirs, np.float32), atol=1e-3)
    np.testing.assert_allclose(found.scores.numpy(), np.asarray(probs, np.float32), atol=1e-5)
    x1, y1, x2, y2 = found.boxes[0].tolist()
    assert 170 < x1 < x2 < 280 and 50 < y1 < y2 < 190  # Eileen Collins' face
    assert float(found.scores[0]) > 0.99
    assert mtcnn.labels == ("face",) and found.labels.tolist() == [0]


def test_a_batch_gives_each_image_its_own_faces_and_a_blank_image_none(mtcnn, astronaut):
    found = mtcnn.detect(as_batch(astronaut, np.zeros_like(astronaut), astronaut[:, ::-1].copy()))
    assert [len(f) for f in found] == [1, 0, 1]
    mirrored = found[2].boxes[0]
    torch.testing.assert_close(mirrored[[2, 0]], 512 - found[0].boxes[0][[0, 2]], atol=4.0, rtol=0)


def test_weights_that_do_not_fit_name_the_network(tmp_path):
    folder = tmp_path / "mtcnn_weights"
    shutil.copytree(Path(facenet.__file__).parent / "data", folder)
    torch.save({"conv1.weight": torch.zeros(1)}, folder / "rnet.pt")
    (tmp_path / "broken.toml").write_text((MODELS / "mtcnn.toml").read_text()
                                          .replace('name = "mtcnn"', 'name = "broken"')
                                          .replace('package = "facenet_pytorch"\nfile = "data"',
                                                   'path = "mtcnn_weights"'))
    registry = ModelRegistry.from_dir(tmp_path, CPU)
    assert "rnet.pt: key mismatch" in registry.unavailable["broken"].reason
    assert registry.unavailable["broken"].task == "detection"
    bad = tmp_path / "bad.toml"
    bad.write_text((MODELS / "mtcnn.toml").read_text().replace('task = "detection"', 'task = "segmentation"'))
    with pytest.raises(CardError, match="task"):
        read_card(bad)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def test_a_detector_is_listed_as_one_and_refuses_the_classifier_methods(astronaut):
    registry = ModelRegistry.from_dir(MODELS, CPU, only={"mtcnn", "tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _):
        listed = {m["name"]: m for m in httpx.get(f"{base}/v1/models", timeout=30).json()}
        assert listed["mtcnn"]["task"] == "detection" and listed["mtcnn"]["available"]
        assert listed["mtcnn"]["num_classes"] == 1
        assert listed["tiny_cnn"]["task"] == "classification"
        assert listed["mtcnn"]["methods"] == ["drise"]  # a black box: no per-box gradients
        assert listed["mtcnn"]["methods_not_applicable"]["gradcam"] == ("mtcnn is an object detector: its "
                                                                        "methods are drise")
        assert "drise" not in listed["tiny_cnn"]["methods"]
        assert "object detectors" in listed["tiny_cnn"]["methods_not_applicable"]["drise"]
        methods = {m["name"]: m for m in httpx.get(f"{base}/v1/methods", timeout=30).json()}
        assert methods["drise"]["tasks"] == ["detection"] and methods["drise"]["passes_at_defaults"] == 1000
        assert methods["drise"]["parameters"]["properties"]["n_masks"]["maximum"] == 10_000
        files = [("image", ("a.png", png(astronaut), "image/png"))]
        r = httpx.post(f"{base}/v1/explain/smoothgrad", files=files, data={"model": "mtcnn"}, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_applicable", r.text
        assert "does not apply to mtcnn, an object detector" in r.json()["error"]["message"]
        r = httpx.post(f"{base}/v1/models/mtcnn/sanity", timeout=60)  # the classifier-only sanity report
        assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_task", r.text
        assert "'mtcnn' is an object detector" in r.json()["error"]["message"]
