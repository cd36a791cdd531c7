"""The per-map metrics through the API (issue 25): `outputs=metrics` adds each map's deletion and insertion
figures against a random order (and the stability of a stochastic method's map), validated parameters, their
cost counted in the request's. The curves' math and its oracles (Quantus, identities, a planted model):
tests/test_evidence_curves.py."""
from __future__ import annotations

import base64

import httpx
import pytest
import torch

from service.evidence.curves import forwards_per_image
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server
from tests.test_api import png_bytes, random_image

PINNED = {"deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random", "steps",
          "replacement", "stability"}


@pytest.fixture(scope="module")
def server():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn", cache_bytes=0), registry) as (base, app):
        yield base, app


def image(seed: int = 0) -> list:
    return [("image", ("a.png", png_bytes(random_image(seed)), "image/png"))]


def test_metrics_come_with_the_map_when_asked(server):
    base, _ = server
    r = httpx.post(f"{base}/v1/explain/gradcam", files=image(), data={"outputs": "npy,metrics"}, timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    metrics = result["metrics"]
    assert set(metrics) >= PINNED
    assert metrics["steps"] == 20 and metrics["replacement"] == "blur" and metrics["stability"] is None
    assert len(metrics["deletion_curve"]) == 21 and len(metrics["insertion_curve_random"]) == 21
    # the curves start (deletion) and end (insertion) at the explained class's probability on the image
    assert metrics["deletion_curve"][0] == pytest.approx(result["probability"], abs=1e-6)
    assert metrics["insertion_curve"][-1] == pytest.approx(result["probability"], abs=1e-6)
    assert metrics["deletion_curve"][-1] == pytest.approx(metrics["insertion_curve"][0], abs=1e-6)
    for name in ("deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random"):
        assert 0.0 <= metrics[name] <= 1.0
    plain = httpx.post(f"{base}/v1/explain/gradcam", files=image(), timeout=60).json()["results"][0]
    assert plain.get("metrics") is None  # off by default
    assert plain["map"]["npy"] == result["map"]["npy"]  # the map itself is unchanged by asking


def test_a_stochastic_map_reports_its_stability(server):
    base, _ = server
    r = httpx.post(f"{base}/v1/explain/smoothgrad", files=image(1),
                   data={"outputs": "metrics", "n_samples": "8", "metrics_steps": "5",
                         "metrics_replacement": "black"}, timeout=60)
    assert r.status_code == 200, r.text
    metrics = r.json()["results"][0]["metrics"]
    assert metrics["steps"] == 5 and metrics["replacement"] == "black"
    assert -1.0 <= metrics["stability"] <= 1.0


def test_the_json_form_takes_the_metrics_parameters(server):
    base, _ = server
    body = {"images": [base64.b64encode(png_bytes(random_image(2))).decode()], "outputs": ["metrics"],
            "metrics": {"steps": 4, "replacement": "mean"}}
    r = httpx.post(f"{base}/v1/explain/gradient", json=body, timeout=60)
    assert r.status_code == 200, r.text
    metrics = r.json()["results"][0]["metrics"]
    assert (metrics["steps"], metrics["replacement"]) == (4, "mean")


@pytest.mark.parametrize("data, words", [
    ({"outputs": "metrics", "metrics_steps": "1"}, "steps"),
    ({"outputs": "metrics", "metrics_steps": "many"}, "steps"),
    ({"outputs": "metrics", "metrics_replacement": "noise"}, "replacement"),
    ({"metrics_steps": "10"}, "not among the outputs"),
])
def test_bad_metrics_parameters_are_a_422_naming_them(server, data, words):
    base, _ = server
    r = httpx.post(f"{base}/v1/explain/gradcam", files=image(), data=data, timeout=60)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_metrics" and words in error["message"], error


def test_the_metrics_forwards_count_in_the_request_cost():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    limit = forwards_per_image(20)  # Grad-CAM's one pass plus the metrics' forwards is one more
    with running_server(Settings(default_model="tiny_cnn", max_request_cost=limit), registry) as (base, _):
        refused = httpx.post(f"{base}/v1/explain/gradcam", files=image(), data={"outputs": "metrics"},
                             timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "too_costly", refused.text
        assert "metrics" in refused.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/explain/gradcam", files=image(), timeout=60).status_code == 200


def test_a_setting_turns_the_metrics_on_by_default():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn", metrics_by_default=True), registry) as (base, _):
        result = httpx.post(f"{base}/v1/explain/gradcam", files=image(), timeout=60).json()["results"][0]
        assert set(result["metrics"]) >= PINNED and "npy" in result["map"]
        only_png = httpx.post(f"{base}/v1/explain/gradcam", files=image(), data={"outputs": "png"},
                              timeout=60).json()["results"][0]
        assert only_png.get("metrics") is None  # outputs named: exactly those


def test_the_python_client_carries_the_metrics(server):
    from saliency_client import Client

    base, _ = server
    with Client(base) as client:
        result = client.explain(png_bytes(random_image(3)), "gradcam", outputs=("npy", "metrics"))[0]
    assert result.metrics is not None and set(result.metrics) >= PINNED and result.map is not None
