"""Label Studio end to end: a real Label Studio (from .venv/tools) calls the saliency ML backend, which calls
a real saliency server; the stored predictions are decoded with label-studio-sdk and compared with the map."""
from __future__ import annotations

import io
import json
import subprocess
import time

import httpx
import numpy as np
import pytest
import torch

from saliency_client import Client, salient_region
from service.evidence.curves import forwards_per_image, perturbation_curves, random_order
from service.methods import Explainee
from service.settings import Settings
from tests.integrations.tools import PYTHON, ROOT, process, run_inner_pytest
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
def backend(saliency, label_studio, tmp_path_factory):
    ls_url, token = label_studio
    port = free_port()
    env = {"SALIENCY_URL": saliency, "SALIENCY_METHOD": "gradcam", "SALIENCY_THRESHOLD": "0.5",
           "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": token}
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    with process([str(PYTHON), "-m", "saliency_labelstudio", "--port", str(port)], env, log,
                 f"http://127.0.0.1:{port}/health", 60):
        yield f"http://127.0.0.1:{port}"


def stored_prediction(label_studio, backend: str, photo: bytes, title: str,
                      extra_params: dict | None = None) -> dict:
    """What Label Studio stores for `photo` in a new project connected to the backend (with its extra_params,
    passed to /setup), after "Retrieve Predictions"."""
    ls_url, token = label_studio
    with httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {token}"}, timeout=120) as ls:
        project = ls.post("/api/projects", json={"title": title, "label_config": LABEL_CONFIG})
        assert project.status_code == 201, project.text
        pid = project.json()["id"]
        imported = ls.post(f"/api/projects/{pid}/import", files={"file": ("chelsea.png", photo, "image/png")})
        assert imported.status_code == 201, imported.text
        [task] = ls.get(f"/api/projects/{pid}/tasks/").json()
        assert task["data"]["image"].startswith("/data/upload/")  # the backend must fetch it with the token

        ml = {"url": backend, "project": pid, "title": "saliency"}
        if extra_params is not None:
            ml["extra_params"] = extra_params
        connected = ls.post("/api/ml", json=ml)
        assert connected.status_code == 201, connected.text  # Label Studio called /health and /setup
        action = ls.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                         json={"selectedItems": {"all": True, "excluded": []}})
        assert action.status_code == 200, action.text
        [stored] = ls.get("/api/predictions", params={"task": task["id"]}).json()
    return stored


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_predictions_round_trip_through_label_studio(saliency, label_studio, backend, chelsea, tmp_path):
    started = time.monotonic()
    photo = png(chelsea)
    stored = stored_prediction(label_studio, backend, photo, "saliency e2e")
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


def test_faithfulness_scores_round_trip_through_label_studio(saliency, label_studio, backend, chelsea):
    """A project connected with extra_params {"score_by": "faithfulness"}: Label Studio passes them to /setup,
    and stores the prediction scored by the map's faithfulness, the figures in each region's meta text."""
    photo = png(chelsea)
    stored = stored_prediction(label_studio, backend, photo, "saliency faithfulness",
                               {"score_by": "faithfulness"})
    with Client(saliency) as client:
        expected = client.explain(photo, "gradcam", outputs=["png", "metrics"])[0]
    assert expected.metrics is not None
    deletion, insertion = expected.metrics["deletion_auc"], expected.metrics["insertion_auc"]
    assert stored["score"] != pytest.approx(expected.probability) and 0 < stored["score"] < 1
    for region in stored["result"]:
        assert region["score"] == pytest.approx(stored["score"])
        [text] = region["meta"]["text"]  # kept as sent: the editor shows it in the region's details
        assert text.startswith(f"faithfulness {stored['score']:.2f}: deletion AUC {deletion:.3f}")
        assert f"insertion AUC {insertion:.3f}" in text


class PatchNet(torch.nn.Module):
    """A planted model: two classes, class 1's logit a linear function of the mean of one 16 x 16 patch of a
    32 x 32 image (a quarter of its pixels), nothing else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = x[:, :, 8:24, 12:28].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(patch), 6.0 * (patch - 0.25)], 1)


def planted_metrics() -> dict[str, list[dict]]:
    """The service's own deletion and insertion curves (service.evidence.curves) of maps of the planted model,
    as a result's `metrics`, for the faithfulness score's oracles: the true map (the patch), its inverse, a
    noise map, and a map whose order is exactly the random order the service plays beside every map."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(21))
    true = torch.zeros(3, 32, 32)
    true[:, 8:24, 12:28] = 1.0
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(22))
    ranks = torch.empty(32 * 32)
    ranks[random_order(32 * 32, seed=0)] = torch.arange(32 * 32, 0, -1, dtype=torch.float32)  # first: highest
    maps = {"true": true, "inverted": 1.0 - true, "noise": noise,
            "random_order": ranks.view(1, 32, 32).expand(3, -1, -1)}
    explainee, targets = Explainee(PatchNet().eval()), torch.ones(3, dtype=torch.long)
    found = {name: [c.as_dict() for c in perturbation_curves(explainee, x, m, targets, steps=20,
                                                              replacement="black")]
             for name, m in maps.items()}
    # blur keeps the patch's mean: the substitution takes nothing from the class, and the games say nothing
    found["true_blur"] = [c.as_dict() for c in perturbation_curves(explainee, x, true, targets, steps=20)]
    return found


def test_backend_units(saliency, registry, chelsea, tmp_path):
    """The backend's own checks (config parsing, token scoping, auth, webhook, scores), run in the tools' env.
    SALIENCY_SMALL_URL is a server whose answers are bounded at 40 KB (max_response_bytes) and whose requests
    at one image's metrics (max_request_cost: two images with metrics are refused as too costly); PLANTED
    holds the curves of planted_metrics(); CHELSEA a photo."""
    chelsea.save(tmp_path / "chelsea.png")
    (tmp_path / "planted.json").write_text(json.dumps(planted_metrics()))
    small_settings = Settings(max_wait_ms=5, max_response_bytes=40_000,
                              max_request_cost=2 * forwards_per_image(20) - 1)
    env = {"SALIENCY_URL": saliency, "PLANTED": str(tmp_path / "planted.json"),
           "CHELSEA": str(tmp_path / "chelsea.png")}
    with running_server(small_settings, registry) as (small, _):
        run_inner_pytest("tests/integrations/labelstudio_checks.py", {**env, "SALIENCY_SMALL_URL": small})
