"""`python -m service add-model ARCH --weights FILE` (issue 26, item 4): the card it writes loads to the same
model as the architecture with those weights (oracle: equal logits, and the derived layer and preprocessing
the adapters give), its labels and preprocessing come from the model's own config, it runs the self-test, and
a model that does not load leaves nothing behind (exit 1, saying why)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.model_cli import add_model
from service.settings import Settings
from service.zoo import ModelRegistry
from service.zoo.adapters import build, derived_preprocess
from service.zoo.card_writer import card_name, card_toml, classifier_width
from service.zoo.cards import read_card
from tests.conftest import MODELS, ROOT

timm = pytest.importorskip("timm")

ARCH = "timm:mobilenetv3_small_050"  # small (1.6M parameters) and its own derived layer (conv_head's act)


def weights_file(tmp_path: Path, architecture: str = ARCH,
                 num_classes: int = 1000) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    module = build(architecture, num_classes).eval()
    path = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path, module


def run(models_dir: Path, *argv: str) -> int:
    return add_model([*argv, "--models-dir", str(models_dir), "--device", "cpu"])


def test_the_written_card_serves_the_model_as_built(tmp_path, capsys):
    weights, module = weights_file(tmp_path)
    models = tmp_path / "models"
    assert run(models, ARCH, "--weights", str(weights)) == 0
    out = capsys.readouterr().out
    assert "mobilenetv3_small_050: passed (full self-test)" in out and "added mobilenetv3_small_050" in out
    card = read_card(models / "mobilenetv3_small_050.toml")
    assert card.architecture == ARCH and card.num_classes == 1000 and card.labels.source == "imagenet-1k"
    assert card.weights.path == ["weights/mobilenetv3_small_050.safetensors"]
    derived = derived_preprocess(ARCH)  # timm's pretrained config, written in as the model's own
    assert card.preprocess == derived and card.preprocess.interpolation == derived.interpolation
    assert card.cam.target_layer and card.cam.reshape == "auto"
    registry = ModelRegistry.from_dir(models, torch.device("cpu"), fold_norms=False)
    served = registry.models["mobilenetv3_small_050"]
    x = torch.randn(2, 3, *card.preprocess.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(served.module(x), module(x), rtol=1e-4, atol=1e-4)
    assert served.card.cam.target_layer == card.cam.target_layer  # loading the card again derives the same


def test_other_class_counts_need_their_names_and_get_them_from_a_file(tmp_path, capsys):
    weights, _ = weights_file(tmp_path, "torchvision:resnet18", num_classes=3)
    models = tmp_path / "models"
    assert run(models, "torchvision:resnet18", "--weights", str(weights)) == 1
    assert "the weights have 3 classes: give their names with --labels FILE" in capsys.readouterr().err
    assert not models.exists() or not list(models.iterdir())
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    assert run(models, "torchvision:resnet18", "--weights", str(weights), "--labels", str(names),
               "--name", "pets") == 0
    card = read_card(models / "pets.toml")
    assert card.num_classes == 3 and card.cam.target_layer == "layer4"  # what torchvision's ResNet pools
    assert card.preprocess.input_size == (224, 224)
    registry = ModelRegistry.from_dir(models, torch.device("cpu"))
    assert registry.models["pets"].labels == ("cat", "dog", "bird")


@pytest.mark.parametrize("problem, words", [
    ("unknown-arch", "unknown architecture 'timm:no_such_net'"),
    ("wrong-shapes", "key mismatch"),
    ("pickle", "refused to load"),
    ("exists", "a card named 'tiny_cnn' exists"),
    ("no-file", "no weights file"),
])
def test_a_model_that_cannot_be_added_exits_1_and_writes_nothing(tmp_path, capsys, problem, words):
    weights, _ = weights_file(tmp_path)
    models = tmp_path / "models"
    arch, name = ARCH, []
    if problem == "unknown-arch":
        arch = "timm:no_such_net"
    elif problem == "wrong-shapes":
        arch = "timm:resnet18"  # mobilenet's weights
    elif problem == "pickle":
        weights = tmp_path / "evil.pth"
        torch.save({"w": torch.zeros(1), "f": print}, weights)  # an object beside the tensors
    elif problem == "exists":
        name = ["--name", "tiny_cnn"]  # a shipped card's name
    elif problem == "no-file":
        weights = tmp_path / "absent.safetensors"
    assert run(models, arch, "--weights", str(weights), *name) == 1
    err = capsys.readouterr().err
    assert "not added" in err and words in err, err
    assert not models.exists() or not list(models.iterdir())


def test_a_failed_self_test_adds_nothing(tmp_path, capsys, monkeypatch):
    from service import selftest

    weights, _ = weights_file(tmp_path)
    real = selftest.full_self_test

    def failing(model, built=None):
        report = real(model, built)
        report.problems.append("planted failure")
        return report

    monkeypatch.setattr(selftest, "full_self_test", failing)
    models = tmp_path / "models"
    assert run(models, ARCH, "--weights", str(weights)) == 1
    captured = capsys.readouterr()
    assert "model: planted failure" in captured.out and "the self-test failed" in captured.err
    assert not models.exists() or not list(models.iterdir())


def test_card_names_and_the_head_width_are_read_from_the_model():
    assert card_name("timm:convnext_tiny") == "convnext_tiny"
    assert card_name("hf:some/dir/My-ViT.v2/") == "my-vit.v2"
    module = build("torchvision:resnet18", 7)
    assert classifier_width(module, module.state_dict()) == 7
    assert classifier_width(module, {}) is None


def test_a_written_card_reads_back_to_the_same_card():
    card = read_card(MODELS / "efficientnet_lite1.toml")
    text = card_toml(card, "a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\nname = ")
    again = tomllib.loads(text)
    assert again["preprocess"]["input_size"] == [240, 240] and again["cam"]["target_layer"] == "bn2"
    reread = type(card).model_validate({**again, "source_file": card.source_file})
    assert reread == card


def test_add_model_is_a_command_of_python_m_service(tmp_path):
    weights, _ = weights_file(tmp_path)
    models = tmp_path / "models"
    done = subprocess.run([sys.executable, "-m", "service", "add-model", ARCH, "--weights", str(weights),
                           "--name", "mine", "--models-dir", str(models), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (models / "mine.toml").is_file()
    done = subprocess.run([sys.executable, "-m", "service", "check-model", "mine", "--models-dir",
                           str(models), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "mine: passed" in done.stdout, done.stderr[-2000:]
    registry = ModelRegistry.from_dir(Settings(models_dir=models).card_dirs, torch.device("cpu"),
                                      only={"mine", "efficientnet_lite0"})
    assert set(registry.models) == {"mine", "efficientnet_lite0"}  # beside the shipped cards, not instead
