"""Label Studio with a detection model (issue 27, item 5): MTCNN's D-RISE on skimage's astronaut. The
backend's checks run under .venv/tools (tests/integrations/labelstudio_detection_checks.py); then a real
Label Studio calls the backend and stores, per face, its box (rectanglelabels), its map (brushlabels, same
label) and the relation between them, as sent."""
from __future__ import annotations

import json
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integrations.tools import PYTHON, ROOT, process, run_inner_pytest
from tests.server import free_port

pytestmark = pytest.mark.integration
pytest.importorskip("facenet_pytorch", reason="facenet-pytorch: make venv installs it (--no-deps)")
data = pytest.importorskip("skimage.data")

N_MASKS = 32  # few masks: seconds on a CPU; the map still peaks on the face
FACES = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="face" background="#00ff00"/></RectangleLabels>
  <BrushLabels name="saliency" toName="image"><Label value="face" background="#ff0000"/></BrushLabels>
</View>"""


@pytest.fixture(scope="module")
def saliency(detector_server):
    return detector_server


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    path = tmp_path_factory.mktemp("astronaut") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def test_backend_detection_checks(saliency, astronaut):
    run_inner_pytest("tests/integrations/labelstudio_detection_checks.py",
                     {"SALIENCY_URL": saliency, "ASTRONAUT": str(astronaut), "N_MASKS": str(N_MASKS)})


def test_detections_round_trip_through_label_studio(saliency, label_studio, astronaut, tmp_path):
    ls_url, token = label_studio
    port = free_port()
    env = {"SALIENCY_URL": saliency, "SALIENCY_METHOD": "drise", "SALIENCY_MODEL": "mtcnn",
           "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": token}
    backend = [str(PYTHON), "-m", "saliency_labelstudio", "--port", str(port)]
    with (process(backend, env, tmp_path / "backend.log", f"http://127.0.0.1:{port}/health", 60),
          httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {token}"}, timeout=300) as ls):
        started = time.monotonic()
        project = ls.post("/api/projects", json={"title": "faces", "label_config": FACES})
        assert project.status_code == 201, project.text
        pid = project.json()["id"]
        imported = ls.post(f"/api/projects/{pid}/import",
                           files={"file": ("astronaut.png", astronaut.read_bytes(), "image/png")})
        assert imported.status_code == 201, imported.text
        [task] = ls.get(f"/api/projects/{pid}/tasks/").json()
        ml = {"url": f"http://127.0.0.1:{port}", "project": pid, "title": "faces",
              "extra_params": {"params": {"n_masks": N_MASKS}}}  # passed to /setup: few masks, quick
        connected = ls.post("/api/ml", json=ml)
        assert connected.status_code == 201, connected.text
        action = ls.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                         json={"selectedItems": {"all": True, "excluded": []}})
        assert action.status_code == 200, action.text
        [stored] = ls.get("/api/predictions", params={"task": task["id"]}).json()
        print(f"Label Studio project -> stored detection prediction in {time.monotonic() - started:.1f}s")

    assert stored["model_version"] == "saliency-drise-mtcnn" and stored["score"] > 0.99
    box, sal, relation = stored["result"]  # stored as sent, the relation included
    assert box["type"] == "rectanglelabels" and box["value"]["rectanglelabels"] == ["face"]
    assert sal["type"] == "brushlabels" and sal["value"]["brushlabels"] == ["face"]
    assert relation == {"id": relation["id"], "type": "relation", "from_id": box["id"], "to_id": sal["id"],
                        "direction": "right"}
    value = box["value"]
    assert 33 < value["x"] < value["x"] + value["width"] < 55 and 10 < value["y"] < value["y"] + value[
        "height"] < 37  # the astronaut's face: x 170-280, y 50-190 of 512 pixels
    out = tmp_path / "decoded.npy"
    subprocess.run([str(PYTHON), str(ROOT / "tests/integrations/decode_brush.py")], check=True, text=True,
                   input=json.dumps({"rle": sal["value"]["rle"], "height": 512, "width": 512,
                                     "out": str(out)}))
    alpha = np.load(out)[..., 3].astype(np.float64)
    x1, y1 = round(value["x"] * 5.12), round(value["y"] * 5.12)
    x2, y2 = round((value["x"] + value["width"]) * 5.12), round((value["y"] + value["height"]) * 5.12)
    inside = alpha[y1:y2, x1:x2]
    assert inside.mean() > 1.2 * (alpha.sum() - inside.sum()) / (alpha.size - inside.size)  # on the face
