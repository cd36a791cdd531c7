"""SALIENCY_MODELS_DIR adds to the shipped cards (models_mode=add, the default) or replaces them (replace); a
default model that is not served makes /readyz 503 with the reason, and start-up logs it."""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from service.zoo import ModelRegistry
from service.zoo.cards import find_cards
from tests.conftest import MODELS
from tests.server import running_server


def add_card(models_dir: Path, name: str, description: str = "", weights: str | None = None) -> None:
    """tiny_cnn's card under another name (or the same), with its weights and labels beside it."""
    text = (MODELS / "tiny_cnn.toml").read_text()
    text = text.replace('name = "tiny_cnn"', f'name = "{name}"')
    if description:
        text = text.replace('description = "Tiny 10-class CNN for tests (not a real classifier)"',
                            f'description = "{description}"')
    if weights:
        text = text.replace('path = "weights/tiny_cnn.safetensors"', f'path = "{weights}"')
    (models_dir / f"{name}.toml").write_text(text)
    for rel in ("weights/tiny_cnn.safetensors", "labels/tiny_cnn.txt"):
        (models_dir / rel).parent.mkdir(exist_ok=True)
        shutil.copyfile(MODELS / rel, models_dir / rel)


@pytest.fixture
def extra(tmp_path: Path) -> Path:
    """A models directory holding one card of its own, `tiny_copy`."""
    add_card(tmp_path, "tiny_copy", "a model of this directory")
    return tmp_path


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@contextlib.contextmanager
def loaded(settings: Settings):
    """The app once its models are loaded, ready or not (tests.server.running_server waits for ready)."""
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while not client.get("/readyz").json()["models_loaded"]:
            assert time.monotonic() < deadline, "the models never loaded"
            time.sleep(0.05)
        yield client


def test_a_models_dir_adds_its_cards_to_the_shipped_ones_by_default(extra):
    settings = Settings(models_dir=extra)
    assert settings.models_mode == "add"
    found = {f.name: f for f in find_cards(settings.card_dirs)}
    assert {"efficientnet_lite0", "tiny_cnn", "tiny_copy"} <= set(found)
    assert found["tiny_copy"].base == extra and found["tiny_cnn"].base == MODELS
    assert [f.name for f in find_cards(Settings(models_dir=extra, models_mode="replace").card_dirs)] == [
        "tiny_copy"]
    assert Settings().card_dirs == Settings(models_dir=MODELS).card_dirs == (MODELS,)  # no card twice


def test_a_card_of_the_same_name_replaces_the_shipped_one(tmp_path):
    add_card(tmp_path, "tiny_cnn", "mine")
    registry = ModelRegistry.from_dir(Settings(models_dir=tmp_path).card_dirs, torch.device("cpu"),
                                      only={"tiny_cnn"})
    assert registry.models["tiny_cnn"].card.description == "mine"


def test_a_models_dir_serves_its_card_beside_the_shipped_default(extra):
    settings = Settings(models_dir=extra, models=["efficientnet_lite0", "tiny_copy"])
    with running_server(settings) as (base, _):
        models = {m["name"]: m for m in httpx.get(f"{base}/v1/models").json()}
        assert models["efficientnet_lite0"]["default"] and not models["tiny_copy"]["default"]
        files = {"image": ("x.png", png(), "image/png")}
        r = httpx.post(f"{base}/v1/explain/gradcam", files=files, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "efficientnet_lite0"
        r = httpx.post(f"{base}/v1/explain/gradcam", files=files, data={"model": "tiny_copy"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny_copy"


def test_replacing_the_cards_without_the_default_model_is_not_ready(extra, caplog):
    caplog.set_level(logging.INFO)
    with loaded(Settings(models_dir=extra, models_mode="replace")) as client:
        r = client.get("/readyz")
        body = r.json()
        assert r.status_code == 503 and body["ready"] is False and body["models"] == ["tiny_copy"]
        assert "default model 'efficientnet_lite0'" in body["error"] and "tiny_copy" in body["error"]
        assert "SALIENCY_DEFAULT_MODEL" in body["error"]
        r = client.post("/v1/explain/gradcam", files={"image": ("x.png", png(), "image/png")})
        assert r.status_code == 503 and "efficientnet_lite0" in r.json()["error"]["message"]
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert any("default model 'efficientnet_lite0'" in line for line in logged), logged


@pytest.mark.parametrize(("settings", "reason"), [
    (dict(models_mode="replace", default_model="tiny_gone"), "default model 'tiny_gone' is unavailable: "),
    (dict(models=["tiny_copy"]), "default model 'efficientnet_lite0' is not among the models to load"),
], ids=["unavailable", "not-loaded"])
def test_a_default_model_not_served_says_why(extra, settings, reason):
    add_card(extra, "tiny_gone", weights="weights/gone.safetensors")
    with loaded(Settings(models_dir=extra, **settings)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and reason in r.json()["error"]
        if "tiny_gone" in reason:
            assert "weights not found" in r.json()["error"]


def test_naming_the_directorys_card_the_default_makes_it_ready(extra):
    settings = Settings(models_dir=extra, models_mode="replace", default_model="tiny_copy")
    with running_server(settings) as (base, _):
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["ready"] and ready["error"] is None and ready["default_model"] == "tiny_copy"
        assert [(m["name"], m["default"]) for m in httpx.get(f"{base}/v1/models").json()] == [
            ("tiny_copy", True)]
        files = {"image": ("x.png", png(), "image/png")}
        r = httpx.post(f"{base}/v1/explain/gradcam", files=files, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny_copy"
