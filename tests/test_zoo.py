"""Model cards, safe loading and preprocessing."""
from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from service.zoo import CardError, ModelRegistry, read_card
from service.zoo.registry import load_model
from service.zoo.tiny import deterministic_weights
from tests.conftest import MODELS

CPU = torch.device("cpu")


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A private copy of the tiny card, its labels and weights."""
    (tmp_path / "labels").mkdir()
    (tmp_path / "weights").mkdir()
    shutil.copy(MODELS / "tiny_cnn.toml", tmp_path)
    shutil.copy(MODELS / "labels" / "tiny_cnn.txt", tmp_path / "labels")
    shutil.copy(MODELS / "weights" / "tiny_cnn.safetensors", tmp_path / "weights")
    return tmp_path


def test_shipped_cards_load_or_explain_why_not(registry):
    assert set(registry.models) == {"efficientnet_lite0", "tiny_cnn"}
    reason = registry.unavailable["resnet50"].reason
    assert "resnet50" in reason and "weights/resnet50.safetensors" in reason
    with pytest.raises(LookupError, match="unavailable"):
        registry.get("resnet50")
    with pytest.raises(LookupError, match="unknown model 'nope'"):
        registry.get("nope")


def test_models_are_in_eval_mode_and_frozen(registry):
    for model in registry.models.values():
        assert not model.module.training
        assert not any(p.requires_grad for p in model.module.parameters())
        assert model.card.cam.target_layer in model.cam_layers


def test_grad_cam_layers_have_more_than_one_position(registry):
    """At a 1 x 1 layer (global pooling) a Grad-CAM map is one value, all zeros once normalised: not
    offered."""
    tiny = registry.get("tiny_cnn")
    assert "gap" not in tiny.cam_layers and tiny.card.cam.target_layer in tiny.cam_layers
    for model in registry.models.values():
        assert all(h * w > 1 for _, h, w in model.cam_layers.values()), model.name


def test_default_model_calls_chelsea_a_cat(default_model, chelsea_batch):
    with torch.no_grad():
        probs = default_model.module(chelsea_batch).softmax(1)[0]
    top = int(probs.argmax())
    assert default_model.labels[top] == "Egyptian cat" and probs[top] > 0.7
    assert top in range(281, 286)  # ImageNet's domestic cats


def test_preprocessing_resizes_the_whole_image_without_crop(default_model):
    image = Image.new("RGB", (448, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 224, 100))  # left half blue
    x = default_model.preprocess.to_pixels(image)
    assert x.shape == (3, 224, 224)
    assert x[2, :, :100].min() > 0.99 and x[0, :, 124:].min() > 0.99  # both halves survive: nothing cropped


def test_an_image_at_input_size_passes_through_unresized(default_model):
    pixels = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8)
    x = default_model.preprocess.to_pixels(Image.fromarray(pixels.numpy()))
    assert torch.equal(x, pixels.permute(2, 0, 1).float() / 255)


def test_malicious_pickle_is_refused_and_never_runs(models_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(models_dir / "weights" / "tiny_cnn.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    card_text = (models_dir / "tiny_cnn.toml").read_text().replace("tiny_cnn.safetensors", "tiny_cnn.pt")
    (models_dir / "tiny_cnn.toml").write_text(card_text)
    with pytest.raises(CardError, match=r"model card 'tiny_cnn': refused to load tiny_cnn.pt"):
        load_model(read_card(models_dir / "tiny_cnn.toml"), models_dir, CPU)
    assert not marker.exists()


def test_plain_tensor_pickle_loads_with_weights_only(models_dir):
    torch.save(deterministic_weights(), models_dir / "weights" / "tiny_cnn.pt")
    (models_dir / "weights" / "tiny_cnn.safetensors").unlink()
    card_text = (models_dir / "tiny_cnn.toml").read_text().replace("tiny_cnn.safetensors", "tiny_cnn.pt")
    (models_dir / "tiny_cnn.toml").write_text(card_text)
    assert load_model(read_card(models_dir / "tiny_cnn.toml"), models_dir, CPU).num_classes == 10


def test_shape_mismatch_names_the_card(models_dir):
    state = deterministic_weights()
    state["fc.weight"] = torch.zeros(7, 32)
    save_file(state, models_dir / "weights" / "tiny_cnn.safetensors")
    with pytest.raises(CardError, match=r"model card 'tiny_cnn': shape mismatch at 'fc.weight'"):
        load_model(read_card(models_dir / "tiny_cnn.toml"), models_dir, CPU)
    registry = ModelRegistry.from_dir(models_dir, CPU)
    assert "shape mismatch" in registry.unavailable["tiny_cnn"].reason


def test_missing_key_names_the_card(models_dir):
    state = deterministic_weights()
    del state["fc.bias"]
    save_file(state, models_dir / "weights" / "tiny_cnn.safetensors")
    with pytest.raises(CardError, match=r"'tiny_cnn': key mismatch: missing \['fc.bias'\]"):
        load_model(read_card(models_dir / "tiny_cnn.toml"), models_dir, CPU)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('architecture = "builtin:tiny_cnn"', 'architecture = "http://evil/x"'),
     "architecture"),
    (lambda t: t.replace('path = "weights/tiny_cnn.safetensors"', 'path = "../../etc/passwd"'), "leaves"),
    (lambda t: t.replace('target_layer = "head"', 'target_layer = "nowhere"'), "target_layer 'nowhere'"),
    (lambda t: t + "\nsurprise = 1\n", "surprise"),
    (lambda t: t.replace("[cam]", "[cam"), "cannot read"),
    (lambda t: t.replace("num_classes = 10", "num_classes = 11"), "mismatch"),
])
def test_bad_cards_are_reported_by_name(models_dir, edit, message):
    path = models_dir / "tiny_cnn.toml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(CardError, match=message) as info:
        load_model(read_card(path), models_dir, CPU)
    assert "tiny_cnn" in str(info.value)
    assert "tiny_cnn" in ModelRegistry.from_dir(models_dir, CPU).unavailable


def test_numpy_preprocessing_equals_normalising_the_pixels(default_model, chelsea):
    # Request threads preprocess in numpy (no torch ops, see Preprocessor.to_array); it must be the same
    # input.
    expected = default_model.preprocess.normalize(default_model.preprocess.to_pixels(chelsea))
    got = default_model.preprocess.batch([chelsea, chelsea])
    assert got.shape == (2, 3, 224, 224) and got.is_contiguous() and got.dtype == torch.float32
    assert (torch.allclose(got[1], expected, atol=1e-5)
            and torch.equal(default_model.preprocess(chelsea), got[0]))


def card_filter(model) -> Image.Resampling:
    """Pillow's filter of the card's interpolation, applied in one step over the whole image (the oracle)."""
    return Image.Resampling[model.card.preprocess.interpolation.upper()]


def test_a_large_photo_is_resized_within_two_levels_of_the_full_filter(default_model):
    # The preprocessor shrinks big uploads in whole-factor blocks first (reducing_gap); the oracle is Pillow's
    # full filter (the card's interpolation) over the whole image.
    rng = np.random.default_rng(5)
    small = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    photo = small.resize((2400, 1800), Image.Resampling.BICUBIC)
    got = np.asarray(default_model.preprocess._resized(photo), dtype=np.int16)
    full = np.asarray(photo.resize((224, 224), card_filter(default_model)), dtype=np.int16)
    assert got.shape == (224, 224, 3) and np.abs(got - full).max() <= 2 and np.abs(got - full).mean() < 0.25


def test_a_large_jpeg_decoded_reduced_gives_the_model_input_within_two_levels(default_model):
    """Decoding a 12 MP JPEG at 1/4 scale (imaging.decode_upload) against the whole decode and Pillow's full
    filter (the card's interpolation) over it: the model sees nearly the same pixels."""
    from service.imaging import decode_image, decode_upload

    rng = np.random.default_rng(6)
    small = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((4032, 3024), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=92)
    limits = dict(max_bytes=50_000_000, max_pixels=40_000_000)
    upload = decode_upload(buffer.getvalue(), **limits, min_side=default_model.preprocess.decode_side)
    assert upload.image.size == (1008, 756) and upload.size == (4032, 3024)
    got = np.asarray(default_model.preprocess._resized(upload.image), dtype=np.int16)
    whole = decode_image(buffer.getvalue(), **limits)
    full = np.asarray(whole.resize((224, 224), card_filter(default_model)), dtype=np.int16)
    assert np.abs(got - full).max() <= 2 and np.abs(got - full).mean() < 0.25
