"""A model's self-test (issue 26, item 3): at load, which methods apply and whether their maps are sane; on
demand (`python -m service check-model`), the invariants too. Oracles: a method built to draw a constant map
is caught; a token model is refused by FullGrad with its reason, shown in /v1/models and answered 422 before
any work; IG's completeness and FullGrad's hold on the tiny CNN; a served model whose logits differ from the
model as built is caught; every broken card is a clear exit 1."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from service.methods import register_method, unregister_method
from service.methods.base import Attribution, HeatmapParams, SinglePassMethod
from service.methods.passes import resolve_targets
from service.model_cli import check_model
from service.selftest import MethodCheck, _invariants, cheapest_params, full_self_test, quick_self_test
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS, ROOT
from tests.server import running_server
from tests.test_methods_fullgrad_api import TokenNet, png
from tests.test_models_dir import add_card


class ConstantMap(SinglePassMethod):
    """A method whose map is the same value everywhere: it ranks nothing."""

    name = "test-constant-map"
    title = "A constant map (registered by a test)"
    Params = HeatmapParams

    def attribute_chunk(self, model, x, targets, params):
        with torch.no_grad():
            logits = model.module(x)
        targets = resolve_targets(logits, targets)
        flat = torch.ones(x.shape[0], x.shape[-2], x.shape[-1])
        return Attribution(flat[:, None], flat, [{} for _ in range(x.shape[0])], logits, targets)


def tiny_registry() -> ModelRegistry:
    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})


def test_every_method_applies_to_the_tiny_cnn_and_keeps_its_invariants():
    model = tiny_registry().models["tiny_cnn"]
    built = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"},
                                   fold_norms=False).models["tiny_cnn"].module
    report = full_self_test(model, built)
    assert report.passed, report.as_dict()
    for name in ("gradcam", "integrated-gradients", "smoothgrad", "fullgrad", "moreaugrad", "gradient"):
        assert report.methods[name].passed
    assert report.methods["integrated-gradients"].figures["completeness"] <= 0.05
    assert report.methods["fullgrad"].figures["completeness"] <= 1e-3  # a ReLU net: exact


def test_a_constant_map_and_logits_unlike_the_built_model_are_caught():
    model = tiny_registry().models["tiny_cnn"]
    register_method(ConstantMap())
    try:
        other = tiny_registry().models["tiny_cnn"].module
        with torch.no_grad():
            next(other.parameters()).add_(0.5)  # not the served weights
        report = full_self_test(model, other)
    finally:
        unregister_method(ConstantMap.name)
    assert not report.passed
    assert report.methods[ConstantMap.name].problems == ["its map is constant"]
    assert report.problems
    assert report.problems[0].startswith("the served model's logits differ from the model as built")


def test_the_completeness_invariants_read_the_methods_diagnostics():
    ig = MethodCheck(applies=True)
    from service.methods import get_method

    _invariants(get_method("integrated-gradients"), {"relative_delta": 0.2, "convergence_delta": 1.0}, ig)
    assert ig.problems == ["completeness: |sum of attributions - (F(x) - F(baseline))| is 20.0% of F(x) - "
                           "F(baseline), above 5%"]
    fullgrad = MethodCheck(applies=True)
    _invariants(get_method("fullgrad"), {"completeness_gap": 0.12, "complete": False}, fullgrad)
    assert fullgrad.problems == ["completeness: the decomposition misses 12.0% of the score"]


def test_cheapest_params_put_every_cost_factor_at_its_minimum():
    from service.methods import METHODS

    for method in METHODS.values():
        assert method.cost(cheapest_params(method)) == 1, method.name


def test_a_method_that_does_not_apply_is_listed_with_its_reason_and_refused_before_any_work():
    registry = tiny_registry()
    registry.models["tiny_cnn"].module = TokenNet().eval().requires_grad_(False)
    report = quick_self_test(registry.models["tiny_cnn"])
    assert "fullgrad" not in report.applicable and "gradient" in report.applicable
    refusal = "FullGrad needs a CNN: Linear layer 'mlp' acts on tokens"
    assert report.not_applicable["fullgrad"].startswith(refusal)
    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _):
        listed = httpx.get(f"{base}/v1/models", timeout=30).json()[0]
        assert "fullgrad" not in listed["methods"] and "gradient" in listed["methods"]
        assert listed["methods_not_applicable"]["fullgrad"] == report.not_applicable["fullgrad"]
        assert listed["self_test"]["passed"] is True
        r = httpx.post(f"{base}/v1/explain/fullgrad", files=[("image", ("x.png", png(), "image/png"))],
                       timeout=60)
        assert r.status_code == 422 and r.json()["error"]["code"] == "method_not_applicable"
        assert r.json()["error"]["message"] == report.not_applicable["fullgrad"]


def test_the_self_test_can_be_switched_off():
    settings = Settings(default_model="tiny_cnn", self_test_at_load=False)
    with running_server(settings, tiny_registry()) as (b, _):
        listed = httpx.get(f"{b}/v1/models", timeout=30).json()[0]
        assert listed["methods"] is None and listed["self_test"] is None


# ------------------------------------------------------------------------------------ check-model


def broken_cards(models_dir: Path) -> None:
    add_card(models_dir, "good")
    add_card(models_dir, "no_layer")
    text = (models_dir / "no_layer.toml").read_text()
    (models_dir / "no_layer.toml").write_text(text.replace('target_layer = "head"', 'target_layer = "nope"'))
    add_card(models_dir, "wrong_arch")
    text = (models_dir / "wrong_arch.toml").read_text()
    (models_dir / "wrong_arch.toml").write_text(text.replace('"builtin:tiny_cnn"', '"timm:no_such_net"'))
    add_card(models_dir, "wrong_weights", weights="weights/other.safetensors")
    from safetensors.torch import save_file

    save_file({"stem.weight": torch.zeros(3, 3)}, str(models_dir / "weights" / "other.safetensors"))


@pytest.fixture
def cards(tmp_path: Path) -> Path:
    broken_cards(tmp_path)
    return tmp_path


def test_check_model_passes_a_good_model(cards, capsys):
    assert check_model(["good", "--models-dir", str(cards), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("good: passed (full self-test)")
    assert "integrated-gradients   ok (completeness" in out


@pytest.mark.parametrize("name, words", [
    ("no_layer", "cam.target_layer 'nope"),
    ("wrong_arch", "no_such_net"),
    ("wrong_weights", "weights"),
    ("no_such_model", "unknown model 'no_such_model'"),
])
def test_check_model_says_why_a_model_does_not_load(cards, capsys, name, words):
    assert check_model([name, "--models-dir", str(cards), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: ") and words in err, err


def test_check_model_is_a_command_of_python_m_service(cards):
    done = subprocess.run([sys.executable, "-m", "service", "check-model", "good", "--models-dir", str(cards),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "good: passed" in done.stdout


def test_broken_cards_are_listed_unavailable_with_their_reason_and_the_server_serves_the_rest(cards):
    """The same broken cards at load (issue 26's Must-show): each listed as unavailable, with a reason naming
    the problem, while the good one serves."""
    settings = Settings(models_dir=cards, models_mode="replace", default_model="good")
    with running_server(settings) as (base, _):
        listed = {m["name"]: m for m in httpx.get(f"{base}/v1/models", timeout=30).json()}
        assert listed["good"]["available"] and listed["good"]["self_test"]["passed"]
        reasons = {name: listed[name]["reason"] for name in ("no_layer", "wrong_arch", "wrong_weights")
                   if not listed[name]["available"]}
        assert "cam.target_layer 'nope' is not a layer" in reasons["no_layer"]
        assert "unknown architecture 'timm:no_such_net'" in reasons["wrong_arch"]
        assert "key mismatch: missing" in reasons["wrong_weights"]
        assert "stem.weight" in reasons["wrong_weights"]
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        r = httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("x.png", png(), "image/png"))],
                       data={"model": "wrong_weights"}, timeout=60)
        assert r.status_code in (404, 503) and "key mismatch" in r.json()["error"]["message"]
        r = httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("x.png", png(), "image/png"))],
                       timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "good"


def test_the_quick_self_test_at_load_checks_no_completeness(caplog):
    """At one step an integral is not complete: the quick depth must not report it as a failure."""
    report = quick_self_test(tiny_registry().models["tiny_cnn"])
    assert report.passed, report.as_dict()
    assert "completeness" not in report.methods["integrated-gradients"].figures


def test_fullgrad_incompleteness_on_a_smooth_activation_is_a_figure_not_a_failure():
    from service.methods import get_method
    from service.selftest import smooth_activation

    smooth = MethodCheck(applies=True)
    _invariants(get_method("fullgrad"), {"completeness_gap": 0.031, "complete": False}, smooth, "Hardswish")
    assert smooth.passed and smooth.figures["completeness"] == 0.031
    assert smooth.figures["completeness_note"].startswith("approximate: Hardswish is not piecewise linear")
    assert smooth_activation(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.SiLU())) == "SiLU"
    relus = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU6(), torch.nn.LeakyReLU())
    assert smooth_activation(relus) is None
