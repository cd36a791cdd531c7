"""FullGrad on a token model through the real HTTP API: a 422 whose message names the Linear layer acting on
tokens (the method refuses it: FullGrad's map is a CNN's), never a 500 or a silently wrong map."""
from __future__ import annotations

import io

import httpx
import numpy as np
import torch
from PIL import Image
from torch import nn

from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server


class TokenNet(nn.Module):
    """64x64 image -> 16x16 patches -> 16 tokens of 16 channels -> Linear on (N, T, C) -> mean -> 10
    classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 16, stride=16)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(torch.relu(self.mlp(tokens)).mean(1))


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3),
                                                         dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_fullgrad_on_a_token_model_answers_422_naming_the_layer():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    torch.manual_seed(0)
    # served under tiny_cnn's card
    registry.models["tiny_cnn"].module = TokenNet().eval().requires_grad_(False)
    with running_server(Settings(default_model="tiny_cnn", cache_bytes=0), registry) as (base, _):
        files = [("image", ("x.png", png(), "image/png"))]
        r = httpx.post(f"{base}/v1/explain/fullgrad", files=files, timeout=60)
        assert r.status_code == 422, r.text[:300]
        error = r.json()["error"]
        assert error["code"] == "method_not_applicable"  # known from the model's self-test at load
        assert error["message"].startswith("FullGrad needs a CNN: Linear layer 'mlp' acts on tokens")
        assert "(16, 16) per image" in error["message"]
        # the model itself is fine: a method defined for it answers 200 on the same server
        assert httpx.post(f"{base}/v1/explain/gradient", files=files, timeout=60).status_code == 200
