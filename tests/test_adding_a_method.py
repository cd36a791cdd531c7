"""A method added from outside the service, as docs/adding-a-method.md describes: its class and one
registration, no other file touched. It reaches GET /v1/methods with the facts its class declares, admission
counts its cost, and POST /v1/explain serves it. The toy is gradient x input (Shrikumar et al. 2016), checked
against autograd."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from pydantic import Field

from service.methods import register_method, unregister_method
from service.methods.base import Attribution, HeatmapParams, SinglePassMethod
from service.methods.passes import class_scores, resolve_targets
from service.methods.postprocess import heatmap
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server
from tests.test_api import png_bytes, random_image


class ToyParams(HeatmapParams):
    repeats: int = Field(2, ge=1, le=8, description="gradients averaged (all equal: a cost to count)")


class GradientTimesInput(SinglePassMethod):
    name = "toy-gradient-x-input"
    title = "Gradient x Input (a toy registered by a test)"
    Params = ToyParams
    cost_factors = ("repeats",)
    diagnostics = {"repeats": "gradients averaged"}

    def attribute_chunk(self, model, x, targets, params):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = model.module(xg)
            targets = resolve_targets(logits, targets)
            grads = sum(torch.autograd.grad(class_scores(logits, targets).sum(), xg, retain_graph=True)[0]
                        for _ in range(params.repeats)) / params.repeats
        attribution = (grads * x).detach()
        return Attribution(attribution, heatmap(attribution, params.aggregation, params.normalization),
                           [{"repeats": params.repeats} for _ in range(x.shape[0])], logits.detach(), targets)


@pytest.fixture(scope="module")
def toy_server():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    register_method(GradientTimesInput())
    try:
        with running_server(Settings(default_model="tiny_cnn", max_request_cost=6), registry) as (url, _):
            yield url, registry.models["tiny_cnn"]
    finally:
        unregister_method(GradientTimesInput.name)


def test_a_registered_method_is_listed_with_the_facts_its_class_declares(toy_server):
    url, _ = toy_server
    listed = {m["name"]: m for m in httpx.get(f"{url}/v1/methods").json()}
    toy = listed[GradientTimesInput.name]
    assert toy["title"] == GradientTimesInput.title
    assert (toy["cost"], toy["cost_factors"], toy["passes_at_defaults"]) == ("repeats passes", ["repeats"], 2)
    assert toy["iterative"] is False and toy["diagnostics"] == {"repeats": "gradients averaged"}
    assert toy["parameters"]["properties"]["repeats"]["default"] == 2


def test_a_registered_method_explains_and_equals_autograd(toy_server):
    url, model = toy_server
    image = random_image(7)
    r = httpx.post(f"{url}/v1/explain/{GradientTimesInput.name}", timeout=60,
                   files={"image": ("a.png", png_bytes(image), "image/png")},
                   data={"size": "input", "outputs": "npy,raw", "repeats": "3"})
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]
    x = model.preprocess(image).unsqueeze(0)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        logits = model.module(xg)
        target = int(logits.argmax())
        (grad,) = torch.autograd.grad(logits[0, target], xg)
    assert got["target"] == target and got["diagnostics"]["repeats"] == 3
    raw = np.load(io.BytesIO(base64.b64decode(got["raw"])))
    np.testing.assert_allclose(raw, (grad * x)[0].numpy(), rtol=1e-4, atol=1e-6)


def test_admission_counts_a_registered_methods_cost(toy_server):
    url, _ = toy_server
    files = [("image", ("a.png", png_bytes(random_image(1)), "image/png"))] * 2
    r = httpx.post(f"{url}/v1/explain/{GradientTimesInput.name}", files=files, data={"repeats": "4"},
                   timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_costly"  # 2 images x 4 passes > 6
    assert "costs 8 forward+backward passes" in r.json()["error"]["message"]
