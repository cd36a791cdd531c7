"""Zero-configuration adapters (service/zoo/adapters.py), each family against an oracle.

- Every family of FAMILIES (random weights, tiny configurations), at a square and a non-square input: the
  Grad-CAM map has the input's aspect, is not constant, and equals pytorch-grad-cam's at the adapter's layer
  with the adapter's reshape on the same weights.
- Planted models: a ViT whose head reads one patch token (with 1, 2 and 5 prefix tokens) has its Grad-CAM
  peak at that patch; a CNN whose logit is the mean of a region lights that region and nothing else.
- Cards: the derived defaults are those the shipped cards write by hand; a card with only an architecture
  and weights loads, a ViT card at a non-square size too; each value a card writes overrides the derived one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn

from service.methods import METHODS, Explainee
from service.zoo import CardError, read_card
from service.zoo.adapters import (
    FAMILIES,
    NON_SQUARE,
    SQUARE,
    Adapter,
    Family,
    adapt,
    build,
    derived_preprocess,
    family_facts,
    fixed_input_size,
    probe,
)
from service.zoo.cards import IMAGENET_MEAN, IMAGENET_STD
from service.zoo.registry import load_model
from service.zoo.reshape import StageMaps, Tokens, vit_tokens
from tests.conftest import MODELS

timm = pytest.importorskip("timm")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

CPU = torch.device("cpu")
GRADCAM = METHODS["gradcam"]


_MODULES: dict[tuple[str, tuple[int, int]], nn.Module] = {}
_ADAPTERS: dict[tuple[str, tuple[int, int]], Adapter] = {}


def module_of(family: Family, size: tuple[int, int]) -> nn.Module:
    """One module per family, rebuilt per size only where the architecture fixes it at build."""
    if not fixed_input_size(family.architecture):
        size = SQUARE
    key = (family.architecture, size)
    if key not in _MODULES:
        torch.manual_seed(0)
        _MODULES[key] = calibrate(family.build(size), size)
    return _MODULES[key]


def subject(family: Family, size: tuple[int, int]) -> tuple[nn.Module, Adapter]:
    """The family's module and its adapter at `size`."""
    module, key = module_of(family, size), (family.architecture, size)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = adapt(module, family.architecture, size)
    return module, _ADAPTERS[key]


def calibrate(module: nn.Module, size: tuple[int, int]) -> nn.Module:
    """BatchNorm statistics of a batch of random images, so that a deep random net's activations neither
    vanish nor blow up (at its initial statistics torchvision's EfficientNet-B0 shrinks them 1e-13-fold, and
    its maps are float rounding). Weights stay random."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: over one batch, that batch's statistics
        with torch.no_grad():
            module.train()(torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2)))
    return module.eval()


def gradcam(module, layer, reshape, x, targets):
    explainee = Explainee(module=module, cam_layer=layer, reshape=reshape)
    return GRADCAM.attribute(explainee, x, targets, GRADCAM.Params())


def peer_gradcam(module, layer, reshape, x, targets) -> np.ndarray:
    with pgc.GradCAM(model=module, target_layers=[module.get_submodule(layer)],
                     reshape_transform=reshape) as cam:
        return cam(input_tensor=x.clone().requires_grad_(True),
                   targets=[ClassifierOutputTarget(int(t)) for t in targets])


def images(size, n=2, seed=1):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- every family

@pytest.mark.parametrize("size", [SQUARE, NON_SQUARE], ids=["square", "non-square"])
@pytest.mark.parametrize("family", FAMILIES, ids=[f.architecture for f in FAMILIES])
def test_every_family_matches_pytorch_grad_cam(family, size):
    module, adapter = subject(family, size)
    x = images(size, n=1)
    ours = gradcam(module, adapter.default_layer, adapter.reshape, x, torch.tensor([-1]))
    assert ours.heatmap.shape == (1, *size)  # the input's aspect
    h, w = ours.attribution.shape[-2:]
    assert (h < w) == (size[0] < size[1]) and h * w > 1
    assert float(ours.heatmap.max() - ours.heatmap.min()) > 0.5  # min-max of a non-constant map: 1
    peer = without_in_place_relu(module)
    theirs = peer_gradcam(peer, adapter.default_layer, adapter.reshape, x, ours.targets)
    np.testing.assert_allclose(ours.heatmap.numpy(), theirs, atol=2e-4)


class _DenseNet(torchvision.models.DenseNet):
    def forward(self, x):
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))


def without_in_place_relu(module: nn.Module) -> nn.Module:
    """torchvision's DenseNet applies F.relu(inplace=True) to its features' output. pytorch-grad-cam's tensor
    hook then gets the gradient of the value before it and its activation record (sharing the storage) the
    value after it, a mix; the service reads both after it (the relu'd map the head pools). With the ReLU
    out of place both compute Grad-CAM of the same tensor, and the maps agree to float rounding."""
    if not isinstance(module, torchvision.models.DenseNet):
        return module
    copy = _DenseNet.__new__(_DenseNet)
    copy.__dict__ = module.__dict__.copy()
    return copy


@pytest.mark.parametrize("family, layer", [
    (FAMILIES[3], "layers.3.blocks.0.norm1"),  # timm Swin: pytorch-grad-cam's layer, channels-last
    (FAMILIES[4], "stages.3.blocks.1.norm"),  # timm ConvNeXt: inside a block, channels-last
    (FAMILIES[-2], "features.7.2.block.2"),  # torchvision ConvNeXt: its LayerNorm between two Permutes
], ids=["timm-swin", "timm-convnext", "torchvision-convnext"])
def test_channels_last_layers_inside_the_stages(family, layer):
    module, adapter = subject(family, NON_SQUARE)
    assert isinstance(adapter.reshape, StageMaps)
    out = next(o.tensor for o in probe(module, NON_SQUARE) if o.name == layer)
    assert out.shape[1:3] == adapter.reshape(out).shape[2:]  # it was (B, h, w, C)
    x = images(NON_SQUARE)
    ours = gradcam(module, layer, adapter.reshape, x, torch.tensor([-1, -1]))
    theirs = peer_gradcam(module, layer, adapter.reshape, x, ours.targets)
    np.testing.assert_allclose(ours.heatmap.numpy(), theirs, atol=2e-4)


def test_stage_maps_leave_a_channels_first_map_alone_and_refuse_what_fits_no_stage():
    reshape = StageMaps("m", frozenset({(32, 4, 6), (64, 2, 3)}))
    t = torch.randn(1, 32, 4, 6)
    assert reshape(t) is t  # a conv's output (the patch embedding), not permuted
    assert torch.equal(reshape(t.permute(0, 2, 3, 1)), t)
    with pytest.raises(ValueError, match=r"model 'm': activation \(1, 4, 6, 33\) is not a stage map"):
        reshape(torch.randn(1, 4, 6, 33))


def test_family_facts_lists_what_the_adapter_derives():
    [vit] = family_facts(FAMILIES[:1])
    assert vit.architecture == "timm:vit_tiny_patch16_224" and vit.default_layer == "blocks.1.norm1"
    assert vit.grids == {SQUARE: (4, 4), NON_SQUARE: (4, 6)} and "drop 1 prefix" in vit.reshape


# ------------------------------------------------------------------------------------------------ ViTs

def planted_vit(cls, size, patch, **kwargs):
    """A one-head ViT whose logit 0 is 0.5 |x_k|^2 of patch token k at the output (logit 1 its negative).

    The last block is made to pass each token's norm1 output n straight through: its attention is saturated
    on the token itself (q = k = 3 n) with value and projection the identity, its MLP is zero, and the final
    norm is removed. So the output token is x_k + n_k, its gradient reaches norm1 only at token k, as
    g = x_k + n_k, and Grad-CAM at norm1 is proportional to g . n_j = (sigma_k + 1) n_k . n_j: LayerNorm
    gives every n_j the same norm, so the map peaks at j = k (Cauchy-Schwarz)."""
    k = patch[0] * (size[1] // 16) + patch[1]

    class Planted(cls):
        def forward_head(self, x, pre_logits=False):
            y = 0.5 * x[:, self.num_prefix_tokens + k].pow(2).sum(1, keepdim=True)
            return torch.cat([y, -y], 1)

    torch.manual_seed(0)
    vit = Planted(img_size=size, patch_size=16, embed_dim=32, depth=2, num_heads=1, num_classes=2, **kwargs)
    last, dim = vit.blocks[-1], 32
    eye = torch.eye(dim)
    with torch.no_grad():
        last.attn.qkv.weight.copy_(torch.cat([3 * eye, 3 * eye, eye]))
        last.attn.qkv.bias.zero_()
        last.attn.proj.weight.copy_(eye)
        last.attn.proj.bias.zero_()
        last.mlp.fc2.weight.zero_()
        last.mlp.fc2.bias.zero_()
    vit.norm = nn.Identity()
    return vit.eval().requires_grad_(False)


def _vit_classes():
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return [(VisionTransformer, {}, 1), (VisionTransformerDistilled, {}, 2),
            (VisionTransformer, {"reg_tokens": 4}, 5)]


@pytest.mark.parametrize("size, patch", [(SQUARE, (1, 3)), (NON_SQUARE, (3, 1)), (NON_SQUARE, (0, 4))],
                         ids=["square", "non-square", "non-square-top-right"])
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["vit", "deit-distilled", "registers"])
def test_a_vit_reading_one_patch_peaks_at_that_patch(variant, size, patch):
    cls, kwargs, prefix = _vit_classes()[variant]
    vit = planted_vit(cls, size, patch, **kwargs)
    adapter = adapt(vit, "planted", size)
    assert adapter.default_layer == "blocks.1.norm1"
    assert adapter.reshape == Tokens("planted", prefix, (size[0] // 16, size[1] // 16))
    result = gradcam(vit, adapter.default_layer, adapter.reshape, images(size), torch.tensor([0, 0]))
    for cam, heat in zip(result.attribution[:, 0], result.heatmap, strict=True):
        assert divmod(int(cam.argmax()), cam.shape[1]) == patch
        row, col = divmod(int(heat.argmax()), size[1])
        assert (row // 16, col // 16) == patch


def test_a_token_count_that_does_not_fit_the_grid_is_an_error_naming_the_model():
    reshape = Tokens("vit-x", 1, (4, 6))
    assert reshape(torch.zeros(2, 25, 8)).shape == (2, 8, 4, 6)
    with pytest.raises(ValueError, match=r"model 'vit-x': activation \(2, 26, 8\) does not fit 1 prefix "
                                         r"tokens \+ a 4x6 patch grid"):
        reshape(torch.zeros(2, 26, 8))
    # The hand-made convention (one class token, square grid) refuses a non-square grid instead of guessing
    with pytest.raises(ValueError, match="does not fit"):
        vit_tokens(torch.zeros(1, 25, 8))
    assert vit_tokens(torch.zeros(1, 17, 8)).shape == (1, 8, 4, 4)


def test_a_vit_asked_for_another_size_than_it_was_built_for_is_an_error():
    vit = module_of(FAMILIES[0], SQUARE)
    with pytest.raises(ValueError, match=r"model 'v': built for 64x64 inputs \(4x4 patches\), asked for "
                                         r"64x96"):
        adapt(vit, "v", NON_SQUARE)


def test_dynamic_img_size_takes_the_grid_of_the_input():
    torch.manual_seed(0)
    vit = build("timm:vit_tiny_patch16_224", 3, depth=1, dynamic_img_size=True).eval()
    assert adapt(vit, "d", NON_SQUARE).reshape == Tokens("d", 1, (4, 6))


# ------------------------------------------------------------------------------------------------- CNNs

class RegionNet(nn.Module):
    """A torchvision-shaped CNN (features, avgpool, classifier) whose logit 0 is, up to a constant, the mean
    over a region of a positive readout of its last features: a gate zeroes the features outside the
    region before the global pooling. Grad-CAM at the layer the head pools is then CAM, sum_k w_k A_k:
    positive on the region and zero elsewhere."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(),
                                      nn.Conv2d(8, 8, 3, stride=4, padding=1), nn.Softplus())
        self.gate = Gate(region)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, 2)
        with torch.no_grad():
            self.classifier.weight[0].uniform_(0.1, 1.0)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.gate(self.features(x))), 1))


class Gate(nn.Module):
    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x):
        return x * self.region


@pytest.mark.parametrize("size, box", [(SQUARE, (slice(0, 2), slice(2, 4))),
                                       (NON_SQUARE, (slice(1, 3), slice(3, 6)))],
                         ids=["square", "non-square"])
def test_a_cnn_whose_logit_is_a_region_mean_lights_that_region(size, box):
    grid = (size[0] // 4, size[1] // 4)
    region = torch.zeros(grid)
    region[box] = 1
    torch.manual_seed(0)
    net = RegionNet(region).eval().requires_grad_(False)
    adapter = adapt(net, "region", size)
    assert adapter.default_layer == "gate"
    result = gradcam(net, adapter.default_layer, adapter.reshape, images(size), torch.tensor([0, 0]))
    # In pixels: the region's box, and that box grown by the 2 pixels bilinear upsampling (x4) blends over
    rows, cols = slice(box[0].start * 4, box[0].stop * 4), slice(box[1].start * 4, box[1].stop * 4)
    near = torch.zeros(size, dtype=torch.bool)
    near[max(rows.start - 2, 0):rows.stop + 2, max(cols.start - 2, 0):cols.stop + 2] = True
    for cam, heat in zip(result.attribution[:, 0], result.heatmap, strict=True):
        assert (cam[region == 1] > 0).all() and (cam[region == 0] == 0).all()
        assert (heat[~near] == 0).all() and heat[rows, cols].max() == 1 and heat[rows, cols].min() > 0


# ------------------------------------------------------------------------------------------------ cards

CLASSIFIER_CARDS = sorted(p.stem for p in MODELS.glob("*.toml") if read_card(p).task == "classification")


@pytest.mark.parametrize("card", CLASSIFIER_CARDS)
def test_the_derived_layer_is_the_one_the_shipped_card_names(card):
    spec = read_card(MODELS / f"{card}.toml")
    size = (64, 64)  # any size finds the same layer
    module = build(spec.architecture, spec.num_classes, size).eval()
    assert adapt(module, card, size).default_layer == spec.cam.target_layer


def test_derived_preprocessing_from_the_libraries_metadata():
    vit = derived_preprocess("timm:vit_tiny_patch16_224")
    assert (vit.input_size, vit.mean, vit.std, vit.interpolation) == ((224, 224), (0.5,) * 3, (0.5,) * 3,
                                                                      "bicubic")
    dino = derived_preprocess("timm:vit_small_patch14_reg4_dinov2")
    assert dino.input_size == (518, 518) and dino.mean == IMAGENET_MEAN
    effnet = derived_preprocess("torchvision:efficientnet_b3")
    assert (effnet.input_size, effnet.interpolation, effnet.mean, effnet.std) == ((300, 300), "bicubic",
                                                                                 IMAGENET_MEAN, IMAGENET_STD)
    resnet = derived_preprocess("torchvision:resnet50")  # what the shipped card's unwritten fields were
    assert (resnet.input_size, resnet.interpolation, resnet.mean) == ((224, 224), "bilinear", IMAGENET_MEAN)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    (tmp_path / "labels").mkdir()
    (tmp_path / "weights").mkdir()
    shutil.copy(MODELS / "labels" / "tiny_cnn.txt", tmp_path / "labels")
    shutil.copy(MODELS / "weights" / "tiny_cnn.safetensors", tmp_path / "weights")
    return tmp_path


def test_a_card_with_only_architecture_and_weights_loads(models_dir):
    path = models_dir / "bare.toml"
    path.write_text('name = "bare"\narchitecture = "builtin:tiny_cnn"\nnum_classes = 10\n'
                    '[weights]\npath = "weights/tiny_cnn.safetensors"\n'
                    '[labels]\nsource = "file"\nfile = "labels/tiny_cnn.txt"\n')
    model = load_model(read_card(path), models_dir, CPU)
    shipped = load_model(read_card(MODELS / "tiny_cnn.toml"), MODELS, CPU)
    assert model.card.cam.target_layer == "head" == shipped.card.cam.target_layer
    assert model.card.preprocess.input_size == (224, 224)  # PreprocessSpec's defaults for a builtin model
    assert shipped.card.preprocess == read_card(MODELS / "tiny_cnn.toml").preprocess  # the card's own


def test_a_vit_card_at_a_non_square_size_loads_and_explains(models_dir):
    torch.manual_seed(0)
    vit = build("timm:vit_tiny_patch16_224", 3, NON_SQUARE)
    save_file(vit.state_dict(), models_dir / "weights" / "v.safetensors")
    (models_dir / "labels" / "three.txt").write_text("a\nb\nc\n")
    path = models_dir / "vit.toml"
    path.write_text('name = "vit"\narchitecture = "timm:vit_tiny_patch16_224"\nnum_classes = 3\n'
                    '[weights]\npath = "weights/v.safetensors"\n'
                    '[preprocess]\ninput_size = [64, 96]\nstd = [0.25, 0.25, 0.25]\n'
                    '[labels]\nsource = "file"\nfile = "labels/three.txt"\n')
    model = load_model(read_card(path), models_dir, CPU)
    pre = model.card.preprocess
    # the card's size and std; timm's pretrained_cfg's mean and interpolation
    assert (pre.input_size, pre.std, pre.mean, pre.interpolation) == ((64, 96), (0.25,) * 3, (0.5,) * 3,
                                                                     "bicubic")
    assert model.card.cam.target_layer == "blocks.11.norm1"
    assert model.reshape == Tokens("vit", 1, (4, 6)) and model.cam_layers["blocks.11.norm1"] == (192, 4, 6)
    result = GRADCAM.attribute(model.explainee(), images(NON_SQUARE, n=1), torch.tensor([-1]),
                               GRADCAM.Params())
    assert result.heatmap.shape == (1, *NON_SQUARE)
    again = load_model(model.card, models_dir, CPU)  # the resolved card loads the same model
    assert again.card == model.card and again.reshape == model.reshape
    # The patch embedding's 24 tokens lack the class token: the load fails saying so
    path.write_text(path.read_text() + '[cam]\ntarget_layer = "patch_embed"\n')
    with pytest.raises(CardError, match=r"'vit': cam.target_layer 'patch_embed' is not a layer .*: "
                                        r"model 'vit': activation \(1, 24, 192\) does not fit 1 prefix "
                                        r"tokens \+ a 4x6"):
        load_model(read_card(path), models_dir, CPU)


def test_card_overrides_and_mismatches(models_dir):
    base = ('name = "t"\narchitecture = "builtin:tiny_cnn"\nnum_classes = 10\n'
            '[weights]\npath = "weights/tiny_cnn.safetensors"\n'
            '[labels]\nsource = "file"\nfile = "labels/tiny_cnn.txt"\n')
    path = models_dir / "t.toml"
    path.write_text(base + '[cam]\ntarget_layer = "block"\n')
    assert load_model(read_card(path), models_dir, CPU).card.cam.target_layer == "block"
    path.write_text(base + '[cam]\nreshape = "vit"\n')
    with pytest.raises(CardError, match=r"'t': cam.reshape 'vit' needs a model with patch tokens"):
        load_model(read_card(path), models_dir, CPU)
