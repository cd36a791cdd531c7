"""The per-model sanity report (service/evidence/sanity.py; methods-reference section 9): cascading
model-parameter randomisation (Adebayo et al. 2018) and the random-logit check.

Oracles: a method built to ignore the model (a Sobel edge map of the input) must fail, while the gradient and
Grad-CAM, which Adebayo et al. found to depend on the weights, pass on the same model; the levels of timm's
EfficientNet run from its classifier to its stem; the served model is never changed; the rank correlation
equals scipy's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata as scipy_rankdata
from scipy.stats import spearmanr
from torch import nn

from service.evidence.sanity import (
    CLASS_LIMIT,
    RANDOMISED_LIMIT,
    cascade_levels,
    randomise,
    rankdata,
    sanity_report,
    shipped_photos,
    spearman,
)
from service.methods import get_method, register_method, unregister_method
from service.methods.base import Attribution, HeatmapParams, SinglePassMethod
from service.methods.gradient import Gradient
from service.methods.passes import resolve_targets
from service.methods.postprocess import minmax
from service.zoo import ModelRegistry
from tests.conftest import MODELS

SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)


class EdgeDetector(SinglePassMethod):
    """A map that ignores the model: the Sobel gradient magnitude of the input's grey level. The model is run
    only for the prediction (the logits every method returns)."""

    name = "test-sobel-edges"
    title = "Sobel edges (a model-free map registered by a test)"
    Params = HeatmapParams

    def attribute_chunk(self, model, x, targets, params):
        with torch.no_grad():
            logits = model.module(x)
        targets = resolve_targets(logits, targets)
        grey = x.mean(1, keepdim=True)
        gx, gy = F.conv2d(grey, SOBEL, padding=1), F.conv2d(grey, SOBEL.transpose(2, 3), padding=1)
        edges = torch.sqrt(gx ** 2 + gy ** 2)
        return Attribution(edges, minmax(edges.squeeze(1)), [{} for _ in range(x.shape[0])], logits, targets)


class CountingGradient(Gradient):
    """The gradient, counting its runs."""

    name = "test-counting-gradient"

    def __init__(self):
        self.runs = 0

    def attribute(self, model, x, targets, params, progress=None):
        self.runs += 1
        return super().attribute(model, x, targets, params, progress)


@pytest.fixture(scope="module")
def tiny():
    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"}).models["tiny_cnn"]


@pytest.fixture(scope="module")
def photos():
    return shipped_photos()


@pytest.fixture(scope="module")
def edges():
    method = register_method(EdgeDetector())
    try:
        yield method
    finally:
        unregister_method(EdgeDetector.name)


def test_the_shipped_photos_are_four_small_rgb_photos(photos):
    assert len(photos) == 4
    for photo in photos:
        assert photo.mode == "RGB" and min(photo.size) == 224


def test_a_map_that_ignores_the_model_fails_and_the_gradient_and_gradcam_pass(tiny, photos, edges):
    x = torch.stack([tiny.preprocess(p) for p in photos])
    methods = [edges, get_method("gradient"), get_method("gradcam")]
    report = sanity_report(tiny, methods, x, seed=0)
    assert report["model"] == "tiny_cnn" and report["images"] == 4
    got = report["methods"]

    sobel = got[EdgeDetector.name]
    assert sobel["verdict"] == "fail"
    assert sobel["reason"].startswith("explains the image, not the model: its map keeps rank correlation "
                                      "1.00 after every layer is randomised")
    assert "not class-discriminative" in sobel["reason"]
    assert [level["spearman"] for level in sobel["levels"]] == pytest.approx([1.0] * 4)
    assert sobel["random_target"]["spearman"] == pytest.approx(1.0)
    assert sobel["levels"][-1]["constant_maps"] == 0
    assert isinstance(sobel["cross_image"]["spearman"], float)  # four different photos: their edges differ
    assert sobel["cross_image"]["spearman"] < RANDOMISED_LIMIT
    assert all(level["spearman_abs"] is None for level in sobel["levels"])  # its map is not signed

    for name in ("gradient", "gradcam"):
        assert got[name]["verdict"] == "pass", got[name]
        assert got[name]["levels"][-1]["spearman"] < RANDOMISED_LIMIT
        assert got[name]["random_target"]["spearman"] < CLASS_LIMIT
    assert [level["layers"] for level in got["gradient"]["levels"]] == [["fc"], ["head"], ["block"], ["stem"]]
    # the gradient's attribution is signed and per pixel: its |attribution| map is compared too
    assert all(isinstance(level["spearman_abs"], float) for level in got["gradient"]["levels"])
    # Grad-CAM's attribution is a map at its layer's size: no per-pixel |attribution|
    assert all(level["spearman_abs"] is None for level in got["gradcam"]["levels"])


def test_efficientnet_levels_run_from_the_classifier_to_the_stem(default_model):
    levels = cascade_levels(default_model.module)
    assert levels[0] == ["classifier"]
    assert levels[1] == ["conv_head"]  # its BatchNorm folded into it at load (bn2 keeps no parameters)
    blocks = [["blocks", str(i)] for i in range(6, -1, -1)]
    assert [level[0].split(".")[:2] for level in levels[2:-1]] == blocks
    assert levels[-1] == ["conv_stem"]
    with_parameters = {n for n, m in default_model.module.named_modules()
                       if any(True for _ in m.parameters(recurse=False))}
    assert sorted(n for level in levels for n in level) == sorted(with_parameters)  # every one, once


def test_efficientnet_unfolded_levels_keep_each_batchnorm_with_its_conv(registry):
    from service.zoo import load_model

    card = registry.get("efficientnet_lite0").card
    unfolded = load_model(card, MODELS, torch.device("cpu"), fold_norms=False).module
    levels = cascade_levels(unfolded)
    assert levels[0] == ["classifier"] and levels[1] == ["conv_head", "bn2"]
    assert levels[-1] == ["conv_stem", "bn1"]


class OutOfOrder(nn.Module):
    """Children declared in another order than the forward uses them; a BatchNorm as its own child."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.stages = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.norm(self.conv(x)))).flatten(1))


def test_levels_follow_the_forward_pass_not_the_declaration():
    model = OutOfOrder().eval()
    assert cascade_levels(model, torch.zeros(1, 3, 16, 16)) == [["fc"], ["stages.1.0"], ["stages.0.0"],
                                                                ["conv", "norm"]]
    wrapped = nn.Sequential(nn.Identity(), model)  # a wrapper: its one model's blocks
    assert cascade_levels(wrapped, torch.zeros(1, 3, 16, 16))[0] == ["1.fc"]


def test_randomise_changes_exactly_the_named_modules_and_is_seeded():
    torch.manual_seed(1)
    model = OutOfOrder().eval()
    with torch.no_grad():  # statistics as if trained, so the BatchNorm's reset shows
        for t, value in ((model.norm.weight, 0.5), (model.norm.bias, 0.1), (model.norm.running_mean, 0.3),
                         (model.norm.running_var, 2.0)):
            t.fill_(value)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    randomise(model, ["fc", "conv", "norm"], torch.Generator().manual_seed(3))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias", "conv.weight", "conv.bias", "norm.weight", "norm.bias",
                       "norm.running_mean", "norm.running_var"}
    assert torch.equal(model.norm.weight, torch.ones(8))  # BatchNorm: an identity map
    assert torch.equal(model.norm.running_var, torch.ones(8))
    again = OutOfOrder().eval()
    again.load_state_dict(before)
    randomise(again, ["fc", "conv", "norm"], torch.Generator().manual_seed(3))
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in after)


def test_the_seed_sets_the_randomised_weights(tiny, photos):
    x = tiny.preprocess(photos[0]).unsqueeze(0)
    runs = [sanity_report(tiny, [get_method("gradient")], x, seed=seed)["methods"]["gradient"]["levels"]
            for seed in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.slow
def test_the_served_model_is_unchanged_and_the_report_is_deterministic(default_model, chelsea_batch, edges):
    with torch.no_grad():
        logits = default_model.module(chelsea_batch)
    state = {k: v.clone() for k, v in default_model.module.state_dict().items()}
    methods = [get_method("gradient"), edges]
    first = sanity_report(default_model, methods, chelsea_batch, seed=5)
    second = sanity_report(default_model, methods, chelsea_batch, seed=5)
    assert first == second
    with torch.no_grad():
        assert torch.equal(default_model.module(chelsea_batch), logits)
    assert all(torch.equal(v, state[k]) for k, v in default_model.module.state_dict().items())
    gradient = first["methods"]["gradient"]
    layers = [level["layers"] for level in gradient["levels"]]
    assert layers[:3] == [["classifier"], ["conv_head"], ["blocks.6"]]
    assert gradient["levels"][-1]["layers"] == ["conv_stem"]
    assert gradient["verdict"] == "pass" and first["methods"][EdgeDetector.name]["verdict"] == "fail"


def test_rank_correlation_equals_scipys_with_ties():
    g = torch.Generator().manual_seed(0)
    for n, values in ((7, 3), (1000, 5), (4096, 1000)):
        a = torch.randint(0, values, (n,), generator=g).float()
        b = torch.randint(0, values, (n,), generator=g).float() + 0.5 * a
        np.testing.assert_array_equal(rankdata(a).numpy(), scipy_rankdata(a.numpy()))
        assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    maps = torch.rand(2, 32, 32, generator=g).round(decimals=1)  # 2-D maps with ties
    expected = spearmanr(maps[0].flatten(), maps[1].flatten()).statistic
    assert spearman(maps[0], maps[1]) == pytest.approx(expected, abs=1e-12)
    assert spearman(torch.zeros(10), torch.arange(10.0)) == 0.0  # a constant map: no ranking (scipy: nan)


def test_a_raising_progress_stops_the_report_before_the_next_run(tiny, photos):
    x = torch.stack([tiny.preprocess(p) for p in photos[:2]])
    counting = CountingGradient()
    calls = []

    class Cancelled(Exception):
        pass

    def progress(done, total):
        calls.append((done, total))
        if done >= 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        sanity_report(tiny, [counting], x, progress=progress)
    assert counting.runs == 3  # the original, the random class, the first level; the second never started
    assert calls[0] == (0, 6) and calls[-1] == (3, 6)  # 1 method x (4 levels + 2)
    assert {done for done, _ in calls} == {0, 1, 2, 3}

    finished = []
    sanity_report(tiny, [counting], x, progress=lambda done, total: finished.append((done, total)))
    assert finished[-1] == (6, 6) and sorted(set(finished)) == [(i, 6) for i in range(7)]
