"""BatchNorm folding (service/zoo/fold.py) against the model as built: the same function, the same maps."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from service.methods import METHODS
from service.settings import Settings
from service.zoo import load_model, read_card
from service.zoo.fold import NormActivation, find_pairs, fold_batchnorms
from tests.conftest import MODELS
from tests.nets import explainee, images, make, randomize_bn, tiny_cnn

CPU = torch.device("cpu")

# Every method; Grad-CAM at a BatchNorm, at a folded conv followed by an in-place ReLU (block.conv1), at a
# folded conv whose BatchNorm output meets the skip (block.conv2), and at a conv with a bias (not folded).
CASES = [("gradcam", {"layer": "block.bn1"}), ("gradcam", {"layer": "block.conv1"}),
         ("gradcam", {"layer": "block.conv2"}), ("gradcam", {"layer": "stem.0"}),
         ("gradient", {}), ("integrated-gradients", {"n_steps": 16}), ("smoothgrad", {"n_samples": 8}),
         ("fullgrad", {}), ("moreaugrad", {"iterations": 3, "n_samples": 4})]


def run(name, net, x, targets, **kw):
    return METHODS[name].attribute(explainee(net), x, targets, METHODS[name].Params(**kw))


@pytest.mark.parametrize(("name", "kw"), CASES,
                         ids=[f"{n}-{kw.get('layer', '')}".rstrip("-") for n, kw in CASES])
def test_every_method_gives_the_maps_of_the_model_as_built(name, kw):
    """Exact equivalence in float64: folding changes the arithmetic's order, not the function."""
    net = tiny_cnn()
    folded, count = fold_batchnorms(net, images(2))
    assert count == 2  # block.conv1/bn1 and block.conv2/bn2; the stem's and head's convs have biases
    x, targets = images(3, seed=1), torch.tensor([1, 2, 3])
    built, ours = run(name, net, x, targets, **kw), run(name, folded, x, targets, **kw)
    assert torch.allclose(ours.attribution, built.attribution, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ours.heatmap, built.heatmap, rtol=1e-9, atol=1e-9)
    assert torch.equal(ours.targets, built.targets)


def test_the_model_as_built_is_left_untouched():
    net = tiny_cnn()
    before = copy.deepcopy(net.state_dict())
    folded, _ = fold_batchnorms(net, images(2))
    assert folded is not net
    assert isinstance(net.block.bn1, nn.BatchNorm2d) and isinstance(folded.block.bn1, nn.Identity)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_fullgrad_counts_the_same_bias_terms_and_stays_complete():
    net = tiny_cnn()
    folded, _ = fold_batchnorms(net, images(2))
    x, targets = images(3, seed=2), torch.tensor([0, 4, 9])
    built, ours = run("fullgrad", net, x, targets), run("fullgrad", folded, x, targets)
    for b, o in zip(built.diagnostics, ours.diagnostics, strict=False):
        assert o["complete"] and o["completeness_gap"] < 1e-9
        # each BatchNorm bias is now its conv's bias: one term each
        assert o["bias_layers"] == b["bias_layers"]
        assert o["score"] == pytest.approx(b["score"], rel=1e-12)


class ConvFeedsTwo(nn.Module):
    """The conv's output goes to the BatchNorm and around it: folding would change the second use."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean((2, 3)))


class SharedConv(nn.Module):
    """One conv called twice, a BatchNorm after its first call only."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x))).mean((2, 3))


class ConvIntoTwoNorms(nn.Module):
    """One conv output normalised twice: folding it into the conv would serve only one of the two."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return (self.bn_a(y) * self.bn_b(y)).mean((2, 3))


class StandardizedConv(nn.Conv2d):
    """Weight standardisation (as timm's StdConv2d): a scale folded into the weight would be divided out."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = StandardizedConv(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def test_a_conv_output_used_twice_is_refused_by_the_logit_check(caplog):
    net = make(ConvFeedsTwo)
    assert len(find_pairs(net, images(2))) == 1  # the tensors match; only the check can tell
    with caplog.at_level(logging.WARNING, logger="service.zoo.fold"):
        folded, count = fold_batchnorms(net, images(2))
    assert folded is net and count == 0
    assert "serving the model unfolded" in caplog.text


@pytest.mark.parametrize("factory",
                         [lambda: make(SharedConv), lambda: make(ConvIntoTwoNorms), lambda: make(StdConvNet)],
                         ids=["shared", "two-norms", "std"])
def test_convs_that_cannot_absorb_a_scale_are_not_paired(factory):
    net = factory()
    assert find_pairs(net, images(2)) == []
    assert fold_batchnorms(net, images(2)) == (net, 0)


def test_batchnorm_in_training_mode_is_not_folded():
    net = tiny_cnn().train()
    assert fold_batchnorms(net, images(2)) == (net, 0)


@pytest.fixture(scope="module")
def as_built():
    """The default model without folding."""
    return load_model(read_card(MODELS / "efficientnet_lite0.toml"), MODELS, CPU, fold_norms=False)


def test_the_default_model_folds_every_batchnorm_and_keeps_its_layer_paths(default_model, as_built):
    """The real model: timm's BatchNormAct2d becomes dropout + activation under the same path."""
    assert sum(isinstance(m, nn.BatchNorm2d) for m in as_built.module.modules()) == 49
    assert sum(isinstance(m, nn.BatchNorm2d) for m in default_model.module.modules()) == 0
    assert sum(isinstance(m, NormActivation) for m in default_model.module.modules()) == 49
    assert default_model.cam_layers == as_built.cam_layers
    assert isinstance(default_model.module.get_submodule("bn2.act"), nn.ReLU6)


@pytest.mark.parametrize(("name", "kw"), [("gradcam", {}), ("gradcam", {"layer": "conv_head"}),
                                          ("gradient", {}), ("integrated-gradients", {"n_steps": 4}),
                                          ("smoothgrad", {"n_samples": 4}), ("fullgrad", {})],
                         ids=lambda v: v if isinstance(v, str) else v.get("layer", ""))
def test_the_default_model_gives_the_same_maps_folded(default_model, as_built, chelsea_batch, name, kw):
    """float32 on the real model: the same maps up to rounding (a ReLU6 unit at its clip may flip)."""
    with torch.no_grad():
        logits, built_logits = default_model.module(chelsea_batch), as_built.module(chelsea_batch)
    assert torch.allclose(logits, built_logits, atol=1e-4)
    params = METHODS[name].Params(**kw)
    target = built_logits.argmax(1)
    ours = METHODS[name].attribute(default_model.explainee(), chelsea_batch, target, params).heatmap.flatten()
    built = METHODS[name].attribute(as_built.explainee(), chelsea_batch, target, params).heatmap.flatten()
    assert torch.corrcoef(torch.stack([ours, built]))[0, 1] >= 0.9999


def test_the_setting_turns_folding_off():
    assert Settings().fold_batchnorm is True
    card = read_card(MODELS / "tiny_cnn.toml")
    kept = load_model(card, MODELS, CPU, fold_norms=False).module
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())


def test_folding_keeps_a_randomised_batchnorm_exact_in_float32():
    """The tiny card's own model in float32, BatchNorm statistics far from the identity."""
    card = read_card(MODELS / "tiny_cnn.toml")
    module = randomize_bn(load_model(card, MODELS, CPU, fold_norms=False).module, seed=3)
    folded, count = fold_batchnorms(module, torch.randn(2, 3, *card.preprocess.input_size))
    assert count == 2
    x = torch.randn(4, 3, *card.preprocess.input_size)
    with torch.no_grad():
        assert torch.allclose(folded(x), module(x), rtol=1e-5, atol=1e-5)


def test_the_logit_check_runs_the_convolutions_without_tf32():
    """On a GPU cuDNN runs float32 convolutions as TF32 by default, whose rounding (~1e-3) is above the
    check's bound: the check turns it off for its two forwards only (an H200 refused every fold before)."""
    card = read_card(MODELS / "tiny_cnn.toml")
    module = load_model(card, MODELS, CPU, fold_norms=False).module
    seen: list[bool] = []
    module.register_forward_pre_hook(lambda _m, _i: seen.append(torch.backends.cudnn.allow_tf32))
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        _, count = fold_batchnorms(module, torch.randn(2, 3, *card.preprocess.input_size))
        assert torch.backends.cudnn.allow_tf32 is True  # restored for serving
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert count == 2 and seen and not any(seen[-2:])
