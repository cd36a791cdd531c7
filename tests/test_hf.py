"""Hugging Face image classifiers saved with save_pretrained (service/zoo/hf.py): tiny configurations built
here and saved into a temporary models directory (nothing is downloaded), loaded through a card as the server
loads them, against transformers' own outputs and pytorch-grad-cam.

- ViT (2 layers, 32 x 32 inputs, 8-pixel patches): the card takes the folder's classes, labels, image
  processor and the adapter's layer; the served logits are the model's own; the preprocessing is the image
  processor's pixel_values; Grad-CAM at the adapter's layer is pytorch-grad-cam's; the full self-test passes.
- Planted ViT and DeiT (1 and 2 prefix tokens, a non-square 4 x 6 grid) whose logit reads one patch:
  Grad-CAM peaks at that patch.
- ResNet and ConvNeXt (tiny): the logits are the model's own, the maps are not constant and equal
  pytorch-grad-cam's; ConvNeXt's channels-last block internals come out (B, C, h, w).
- Bad folders and cards (no config.json, '..', num_classes against the config, transformers missing): the
  model is listed unavailable, naming the problem.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.methods import METHODS, Explainee
from service.selftest import describe, full_self_test
from service.zoo import CardError, ModelRegistry, read_card
from service.zoo.adapters import adapt, probe
from service.zoo.hf import HFClassifier, processor_values
from service.zoo.reshape import StageMaps, Tokens, identity
from tests.conftest import MODELS, ROOT

transformers = pytest.importorskip("transformers")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

CPU = torch.device("cpu")
GRADCAM = METHODS["gradcam"]
LABELS = {0: "cat", 1: "dog", 2: "fox"}


def write_card(models_dir: Path, name: str, folder: str, top: str = "") -> Path:
    """A card of the hf: folder; `top`: more top-level keys (before the [weights] table)."""
    path = models_dir / f"{name}.toml"
    path.write_text(f'name = "{name}"\narchitecture = "hf:{folder}"\n{top}'
                    f'[weights]\npath = "{folder}/model.safetensors"\n')
    return path


def save(models_dir: Path, folder: str, model, processor=None) -> None:
    model.save_pretrained(models_dir / folder)  # config.json and model.safetensors
    if processor is not None:
        processor.save_pretrained(models_dir / folder)  # preprocessor_config.json
    write_card(models_dir, folder, folder)


def images(size, n=2, seed=1) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def gradcam(module, layer, reshape, x, targets):
    explainee = Explainee(module=module, cam_layer=layer, reshape=reshape)
    return GRADCAM.attribute(explainee, x, targets, GRADCAM.Params())


def layers_path(model) -> str:
    """Where a transformers ViT keeps its layers: `layers` in transformers 5, `encoder.layer` in 4."""
    return "layers" if hasattr(model.base_model, "layers") else "encoder.layer"


def sub(module, *paths):
    """The first of `paths` that `module` has (transformers 5's names, then 4's)."""
    for path in paths:
        try:
            return module.get_submodule(path)
        except AttributeError:
            continue
    raise AttributeError(f"none of {paths}")


def peer_gradcam(module, layer, reshape, x, targets) -> np.ndarray:
    with pgc.GradCAM(model=module, target_layers=[module.get_submodule(layer)],
                     reshape_transform=reshape) as cam:
        return cam(input_tensor=x.clone().requires_grad_(True),
                   targets=[ClassifierOutputTarget(int(t)) for t in targets])


# ------------------------------------------------------------------------------------------------ tiny ViT

@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A models directory with tiny_vit: the folder save_pretrained wrote, and its card (architecture and
    weights only); the model and the image processor as saved."""
    models_dir = tmp_path_factory.mktemp("models")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, id2label=LABELS,
                                    label2id={v: k for k, v in LABELS.items()},
                                    initializer_range=0.2)  # wider than the default: maps far from flat
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                               image_std=[0.2, 0.25, 0.3], resample=3)  # PIL's BICUBIC
    save(models_dir, "tiny_vit", model, processor)
    return models_dir, model, processor


@pytest.fixture(scope="module")
def tiny_vit(vit_dir):
    registry = ModelRegistry.from_dir(vit_dir[0], CPU)
    assert not registry.unavailable, registry.unavailable
    return registry.models["tiny_vit"]


def test_the_card_takes_the_folders_classes_labels_preprocessing_and_layer(vit_dir, tiny_vit):
    card = tiny_vit.card
    assert card.num_classes == 3 and tiny_vit.labels == ("cat", "dog", "fox")
    assert card.labels.source == "config"
    pre = card.preprocess
    assert (pre.input_size, pre.interpolation) == ((32, 32), "bicubic")
    np.testing.assert_allclose(pre.mean, (0.4, 0.5, 0.6))
    np.testing.assert_allclose(pre.std, (0.2, 0.25, 0.3))
    assert card.cam.target_layer == f"model.vit.{layers_path(vit_dir[1])}.1.layernorm_before"
    assert tiny_vit.reshape == Tokens("tiny_vit", 1, (4, 4))
    assert tiny_vit.cam_layers[card.cam.target_layer] == (32, 4, 4)


def test_the_served_logits_are_the_models_own(vit_dir, tiny_vit):
    x = images((32, 32))
    with torch.no_grad():
        served = tiny_vit.module(x)
        own = vit_dir[1](pixel_values=x).logits  # the model save_pretrained wrote, not from_config's init
    assert served.shape == (2, 3)
    torch.testing.assert_close(served, own, atol=1e-5, rtol=1e-5)


def test_the_preprocessing_is_the_image_processors(vit_dir, tiny_vit):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    ours = tiny_vit.preprocess(image)
    theirs = vit_dir[2](images=image, return_tensors="pt")["pixel_values"][0]
    # At the input size neither resamples: the same rescale and normalisation, float32 rounding apart (a
    # larger image would differ by the resize filters, Pillow's here against the processor's)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_grad_cam_at_the_adapters_layer_is_pytorch_grad_cams(tiny_vit):
    x = images((32, 32))
    ours = GRADCAM.attribute(tiny_vit.explainee(), x, torch.tensor([-1, 1]), GRADCAM.Params())
    assert ours.heatmap.shape == (2, 32, 32)
    assert all(float(h.max() - h.min()) > 0.5 for h in ours.heatmap)  # min-max of a non-constant map: 1
    theirs = peer_gradcam(tiny_vit.module, tiny_vit.card.cam.target_layer, tiny_vit.reshape, x, ours.targets)
    np.testing.assert_allclose(ours.heatmap.numpy(), theirs, atol=2e-4)


def test_the_full_self_test_passes(tiny_vit):
    report = full_self_test(tiny_vit)
    assert report.passed, "\n".join(describe(report))
    assert "gradcam" in report.applicable
    assert "attention-relevance" in report.not_applicable  # timm's attention blocks only, saying so


# ----------------------------------------------------------------------------------------- planted ViTs

def planted(cls: str, size: tuple[int, int], patch: tuple[int, int], marker: float = 10.0,
            sharpness: float = 10.0) -> tuple[HFClassifier, int]:
    """A transformers ViT (or DeiT) of one head whose logit 0 reads patch `patch` alone; its prefix count.

    Channel 0 marks the patch: the patch embedding writes nothing there, and of the position embeddings only
    the patch's holds `marker` in it. The first layer passes its tokens through (attention and MLP outputs
    zero). In the last, every query is `sharpness` e_0 and each key `sharpness` n_j[0] e_0 (n: its
    layernorm_before's output), so the class token's attention is saturated on the marked patch, whose
    n_k[0] is about sqrt(31) against |n_j[0]| ~ 0.2 elsewhere; value and projection keep channel 0 only, the
    MLP adds nothing. The class token's output is then a constant plus n_k[0] e_0, and logit 0 is channel 0
    of its final layernorm: increasing in n_k[0] (the class token's other channels keep it from saturating).
    The gradient at layernorm_before is c e_0 at token k (c > 0) and zero elsewhere, so Grad-CAM's map is
    relu(c n_j[0]) / N: largest at the marked patch."""
    dim = 32
    kind = cls.removesuffix("ForImageClassification")
    config = getattr(transformers, f"{kind}Config")(
        hidden_size=dim, num_hidden_layers=2, num_attention_heads=1, intermediate_size=64,
        image_size=list(size), patch_size=8, num_labels=2)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    base = model.base_model
    embeddings = base.embeddings
    tokens = [t for t in (embeddings.cls_token, getattr(embeddings, "distillation_token", None))
              if t is not None]
    k = len(tokens) + patch[0] * (size[1] // 8) + patch[1]
    e0 = torch.zeros(dim)
    e0[0] = 1
    with torch.no_grad():
        embeddings.patch_embeddings.projection.weight[0] = 0
        embeddings.patch_embeddings.projection.bias[0] = 0
        for token in tokens:
            token[..., 0] = 0
            token[..., 1:] = torch.randn(dim - 1)
        embeddings.position_embeddings[..., 0] = 0
        embeddings.position_embeddings[0, k, 0] = marker
        first, last = base.get_submodule(layers_path(model))
        for layer in (first, last):
            for linear in (sub(layer, "attention.o_proj", "attention.output.dense"),
                           sub(layer, "mlp.fc2", "output.dense")):
                linear.weight.zero_()
                linear.bias.zero_()
        query = sub(last, "attention.q_proj", "attention.attention.query")
        key = sub(last, "attention.k_proj", "attention.attention.key")
        value = sub(last, "attention.v_proj", "attention.attention.value")
        query.weight.zero_()
        query.bias.copy_(sharpness * e0)
        key.weight.copy_(sharpness * torch.outer(e0, e0))
        key.bias.zero_()
        value.weight.copy_(torch.outer(e0, e0))
        value.bias.zero_()
        sub(last, "attention.o_proj", "attention.output.dense").weight.copy_(torch.eye(dim))
        model.classifier.weight.zero_()
        model.classifier.weight[0, 0], model.classifier.weight[1, 0] = 1, -1
        model.classifier.bias.zero_()
    return HFClassifier(model).eval().requires_grad_(False), len(tokens)


@pytest.mark.parametrize("patch", [(1, 4), (3, 0)], ids=["row-1-col-4", "row-3-col-0"])
@pytest.mark.parametrize("cls", ["ViTForImageClassification", "DeiTForImageClassification"],
                         ids=["vit", "deit"])
def test_a_vit_whose_logit_reads_one_patch_peaks_at_that_patch(cls, patch):
    size = (32, 48)  # a 4 x 6 grid of 8-pixel patches
    net, prefix = planted(cls, size, patch)
    assert prefix == (2 if cls.startswith("DeiT") else 1)
    adapter = adapt(net, "planted", size)
    assert adapter.default_layer == (f"model.{net.model.base_model_prefix}.{layers_path(net.model)}.1."
                                     "layernorm_before")
    assert adapter.reshape == Tokens("planted", prefix, (4, 6))
    result = gradcam(net, adapter.default_layer, adapter.reshape, images(size), torch.tensor([0, 0]))
    for cam, heat in zip(result.attribution[:, 0], result.heatmap, strict=True):
        assert divmod(int(cam.argmax()), cam.shape[1]) == patch
        row, col = divmod(int(heat.argmax()), size[1])
        assert (row // 8, col // 8) == patch


def test_a_vit_asked_for_another_size_than_its_config_is_an_error():
    net, _ = planted("ViTForImageClassification", (32, 48), (0, 0))
    with pytest.raises(ValueError, match=r"model 'v': built for 32x48 inputs \(4x6 patches, config.json's "
                                         r"image_size\), asked for 32x32"):
        adapt(net, "v", (32, 32))


# -------------------------------------------------------------------------------------------------- CNNs

@pytest.fixture(scope="module")
def cnns(tmp_path_factory):
    """tiny_resnet and tiny_convnext (2 stages each, 32 x 32 inputs, a shortest-edge image processor), loaded;
    the models as saved."""
    models_dir = tmp_path_factory.mktemp("cnns")
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 32})
    torch.manual_seed(0)
    resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)).eval()
    convnext = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
        layer_scale_init_value=1.0)).eval()  # the blocks' outputs count (1e-6 by default at init)
    save(models_dir, "tiny_resnet", resnet, processor)
    save(models_dir, "tiny_convnext", convnext, processor)
    registry = ModelRegistry.from_dir(models_dir, CPU)
    assert not registry.unavailable, registry.unavailable
    return registry, {"tiny_resnet": resnet, "tiny_convnext": convnext}


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_convnext"])
def test_a_cnn_loads_and_its_grad_cam_is_pytorch_grad_cams(cnns, name):
    registry, built = cnns
    model = registry.models[name]
    assert model.input_size == (32, 32) and model.num_classes == 3
    x = images((32, 32))
    with torch.no_grad():
        served, own = model.module(x), built[name](pixel_values=x).logits
    # ResNet's BatchNorms are folded into its convolutions at load: the same function, float rounding apart
    torch.testing.assert_close(served, own, atol=1e-4 * float(own.abs().max()), rtol=1e-4)
    layer = model.card.cam.target_layer
    out = next(o.tensor for o in probe(model.module, (32, 32)) if o.name == layer)
    assert model.reshape(out) is out and out.dim() == 4  # the stage the head pools: channels-first already
    ours = GRADCAM.attribute(model.explainee(), x, torch.tensor([-1, -1]), GRADCAM.Params())
    h, w = ours.attribution.shape[-2:]
    assert h * w > 1 and all(float(m.max() - m.min()) > 0.5 for m in ours.heatmap)
    theirs = peer_gradcam(model.module, layer, model.reshape, x, ours.targets)
    np.testing.assert_allclose(ours.heatmap.numpy(), theirs, atol=2e-4)


def test_convnexts_channels_last_block_internals_are_permuted(cnns):
    model = cnns[0].models["tiny_convnext"]
    assert isinstance(model.reshape, StageMaps) and model.card.cam.target_layer == (
        "model.convnext.encoder.stages.1")
    layer = "model.convnext.encoder.stages.1.layers.0.layernorm"  # between the block's two permutes
    out = next(o.tensor for o in probe(model.module, (32, 32)) if o.name == layer)
    assert tuple(out.shape[1:]) == (4, 4, 16) and model.cam_layers[layer] == (16, 4, 4)
    x = images((32, 32))
    ours = GRADCAM.attribute(model.explainee(), x, torch.tensor([0, 2]), GRADCAM.Params(layer=layer))
    theirs = peer_gradcam(model.module, layer, model.reshape, x, ours.targets)
    np.testing.assert_allclose(ours.heatmap.numpy(), theirs, atol=2e-4)
    assert cnns[0].models["tiny_resnet"].reshape is identity


# ------------------------------------------------------------------------------------------ bad input

def test_bad_folders_and_cards_are_unavailable_naming_the_problem(vit_dir, tmp_path, monkeypatch):
    shutil.copytree(vit_dir[0] / "tiny_vit", tmp_path / "good")
    (tmp_path / "empty").mkdir()
    write_card(tmp_path, "good", "good")
    write_card(tmp_path, "no_config", "empty")
    write_card(tmp_path, "gone", "nowhere")
    write_card(tmp_path, "mismatch", "good", top="num_classes = 5\n")
    write_card(tmp_path, "dotdot", "good/../good")
    write_card(tmp_path, "absolute", str(tmp_path / "good"))
    registry = ModelRegistry.from_dir(tmp_path, CPU)
    assert set(registry.models) == {"good"}
    reasons = {name: u.reason for name, u in registry.unavailable.items()}
    assert "no config.json in 'empty'" in reasons["no_config"]
    assert "no config.json in 'nowhere'" in reasons["gone"]
    assert "num_classes = 5, but good/config.json has num_labels = 3" in reasons["mismatch"]
    for name in ("dotdot", "absolute"):
        assert f"model card {name!r}" in reasons[name] and "without '..' segments" in reasons[name]
    # Without transformers: the hf: card is unavailable, saying which extra it needs; the others still load
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    (tmp_path / "weights").mkdir()
    (tmp_path / "labels").mkdir()
    for rel in ("tiny_cnn.toml", "weights/tiny_cnn.safetensors", "labels/tiny_cnn.txt"):
        shutil.copyfile(MODELS / rel, tmp_path / rel)
    registry = ModelRegistry.from_dir(tmp_path, CPU, only={"good", "tiny_cnn"})
    assert set(registry.models) == {"tiny_cnn"}
    assert "needs the optional extra: pip install '.[hf]'" in registry.unavailable["good"].reason


def test_config_labels_are_for_hf_models_only(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('name = "t"\narchitecture = "builtin:tiny_cnn"\nnum_classes = 10\n'
                    '[weights]\npath = "w.safetensors"\n[labels]\nsource = "config"\n')
    with pytest.raises(CardError, match=r"labels.source = 'config' reads an hf: model's config.json"):
        read_card(path)


def test_the_service_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import service.zoo, service.zoo.adapters, service.zoo.hf, service.zoo.registry")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("settings, values", [
    ({"size": {"height": 32, "width": 48}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
     {"input_size": (32, 48), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}),
    ({"size": {"shortest_edge": 224}, "resample": 1}, {"input_size": (224, 224), "interpolation": None}),
    ({"size": {"height": 256, "width": 256}, "do_center_crop": True,
      "crop_size": {"height": 224, "width": 224}, "resample": 0},
     {"input_size": (224, 224), "interpolation": "nearest"}),
    ({"do_rescale": False, "image_mean": [127.5] * 3, "image_std": [127.5] * 3},
     {"mean": (0.5,) * 3, "std": (0.5,) * 3}),
    ({"do_normalize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
     {"mean": (0.0,) * 3, "std": (1.0,) * 3}),
], ids=["height-width", "shortest-edge-lanczos", "centre-crop", "no-rescale", "no-normalize"])
def test_image_processor_settings_map_onto_the_preprocessing(settings, values):
    """What the model sees: the crop where the processor crops (the service resizes the whole image to it);
    (p * rescale_factor - mean) / std on 8-bit p as (p / 255 - mean') / std'; PIL's resample codes, LANCZOS
    (1) with no counterpart left to the default."""
    got = processor_values(settings)
    for key, value in values.items():
        if isinstance(value, tuple) and isinstance(value[0], float):
            np.testing.assert_allclose(got[key], value)
        else:
            assert got.get(key) == value, key


def test_add_model_copies_a_save_pretrained_folder_and_writes_its_card(vit_dir, tmp_path, capsys):
    """`python -m service add-model hf:FOLDER`: the folder is copied into the models directory, the card
    written with the config's labels and the image processor's preprocessing, and the model served equals
    the one saved."""
    from service.model_cli import add_model
    from service.zoo.cards import read_card

    models = tmp_path / "mine"
    source = vit_dir[0] / "tiny_vit"
    argv = [f"hf:{source}", "--name", "my_vit", "--models-dir", str(models), "--device", "cpu"]
    assert add_model(argv) == 0
    assert "my_vit: passed (full self-test)" in capsys.readouterr().out
    card = read_card(models / "my_vit.toml")
    assert card.architecture == "hf:hf/my_vit" and card.weights.path == ["hf/my_vit/model.safetensors"]
    assert card.labels.source == "config" and card.num_classes == 3
    assert card.preprocess.input_size == (32, 32) and card.preprocess.interpolation == "bicubic"
    assert card.preprocess.mean == (0.4, 0.5, 0.6)
    served = ModelRegistry.from_dir(models, CPU).models["my_vit"]
    assert served.labels == ("cat", "dog", "fox")
    x = images((32, 32))
    with torch.no_grad():
        torch.testing.assert_close(served.module(x), vit_dir[1](pixel_values=x).logits, rtol=1e-4, atol=1e-4)
