"""Label Studio end to end: a real Label Studio (from .venv/tools) calls the saliency ML backend, which calls
a real saliency server; the stored predictions are decoded with label-studio-sdk and compared with the map."""
from __future__ import annotations

import io
import json
import secrets
import subprocess
import time

import httpx
import numpy as np
import pytest

from saliency_client import Client, salient_region
from service.settings import Settings
from tests.integrations.tools import PYTHON, ROOT, process, require_tools, run_inner_pytest
from tests.server import free_port, running_server

pytestmark = pytest.mark.integration

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="saliency" toName="image"><Label value="Salient" background="#ff0000"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="Salient" background="#00ff00"/></RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def saliency(registry):
    with running_server(Settings(max_wait_ms=5), registry) as (base, _):
        yield base


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    require_tools()
    data, port, token = tmp_path_factory.mktemp("label-studio"), free_port(), secrets.token_hex(20)
    env = {"LABEL_STUDIO_USERNAME": "admin@example.com", "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
           "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_BASE_DATA_DIR": str(data),
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # 1.23 turns `Token` auth off by default
           # test only: let it call a backend on 127.0.0.1 (its SSRF guard refuses loopback by default)
           "ML_BLOCK_LOCAL_IP": "false", "USE_DEFAULT_BANNED_SUBNETS": "false", "DJANGO_DB": "sqlite"}
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with process([str(PYTHON.with_name("label-studio")), "start", "--no-browser", "--host", "127.0.0.1",
                  "--port", str(port), "--data-dir", str(data)], env, data / "label-studio.log",
                 f"{url}/health", 300):
        print(f"Label Studio up in {time.monotonic() - started:.1f}s")
        yield url, token


@pytest.fixture(scope="module")
def backend(saliency, label_studio, tmp_path_factory):
    ls_url, token = label_studio
    port = free_port()
    env = {"SALIENCY_URL": saliency, "SALIENCY_METHOD": "gradcam", "SALIENCY_THRESHOLD": "0.5",
           "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": token}
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    with process([str(PYTHON), "-m", "saliency_labelstudio", "--port", str(port)], env, log,
                 f"http://127.0.0.1:{port}/health", 60):
        yield f"http://127.0.0.1:{port}"


def test_predictions_round_trip_through_label_studio(saliency, label_studio, backend, chelsea, tmp_path):
    ls_url, token = label_studio
    started = time.monotonic()
    with httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {token}"}, timeout=120) as ls:
        project = ls.post("/api/projects", json={"title": "saliency e2e", "label_config": LABEL_CONFIG})
        assert project.status_code == 201, project.text
        pid = project.json()["id"]
        buf = io.BytesIO()
        chelsea.save(buf, "PNG")
        photo = buf.getvalue()
        imported = ls.post(f"/api/projects/{pid}/import", files={"file": ("chelsea.png", photo, "image/png")})
        assert imported.status_code == 201, imported.text
        [task] = ls.get(f"/api/projects/{pid}/tasks/").json()
        assert task["data"]["image"].startswith("/data/upload/")  # the backend must fetch it with the token

        connected = ls.post("/api/ml", json={"url": backend, "project": pid, "title": "saliency"})
        assert connected.status_code == 201, connected.text  # Label Studio called /health and /setup
        action = ls.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                         json={"selectedItems": {"all": True, "excluded": []}})
        assert action.status_code == 200, action.text
        [stored] = ls.get("/api/predictions", params={"task": task["id"]}).json()
    print(f"Label Studio project -> stored prediction in {time.monotonic() - started:.1f}s")

    assert stored["model_version"] == "saliency-gradcam-efficientnet_lite0"  # the service's default model
    regions = {r["type"]: r for r in stored["result"]}
    assert set(regions) == {"brushlabels", "rectanglelabels"}
    brush, box = regions["brushlabels"], regions["rectanglelabels"]
    assert (brush["original_width"], brush["original_height"]) == chelsea.size == (451, 300)
    assert brush["value"]["format"] == "rle" and brush["value"]["brushlabels"] == ["Salient"]

    with Client(saliency) as client:  # the backend asks for 8-bit PNG maps (a quarter of npy's bytes)
        expected = client.explain(photo, "gradcam", outputs=["png", "npy"])[0]
    assert stored["score"] == pytest.approx(expected.probability)
    out = tmp_path / "decoded.npy"
    subprocess.run([str(PYTHON), str(ROOT / "tests/integrations/decode_brush.py")], check=True, text=True,
                   input=json.dumps({"rle": brush["value"]["rle"], "height": 300, "width": 451,
                                     "out": str(out)}))
    rgba = np.load(out)
    levels = np.round(expected.map * 255).astype(np.uint8)
    for channel in range(4):  # Label Studio keeps the alpha: the saliency shows as graded opacity
        np.testing.assert_array_equal(rgba[..., channel], levels)

    x, y, w, h = salient_region(np.asarray(expected.png, np.float32) / 255, 0.5).box_percent
    value = box["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == pytest.approx((x, y, w, h))
    assert 0 <= value["x"] < value["x"] + value["width"] <= 100 and value["rectanglelabels"] == ["Salient"]


def test_backend_units(saliency, registry):
    """The backend's own checks (config parsing, token scoping, auth, webhook), run in the tools' env;
    SALIENCY_SMALL_URL is a server whose answers are bounded at 40 KB (max_response_bytes)."""
    with running_server(Settings(max_wait_ms=5, max_response_bytes=40_000), registry) as (small, _):
        run_inner_pytest("tests/integrations/labelstudio_checks.py",
                         {"SALIENCY_URL": saliency, "SALIENCY_SMALL_URL": small})
