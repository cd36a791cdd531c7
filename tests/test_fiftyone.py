"""FiftyOne: the helper writes the service's maps as Heatmap fields (and, when asked, their faithfulness
metrics as float fields); checked with the real fiftyone package in .venv/tools (its database cannot run here,
so on in-memory samples)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from saliency_client import Client
from service.evidence.curves import forwards_per_image
from service.settings import Settings
from tests.integrations.tools import run_inner_pytest
from tests.server import running_server

pytestmark = pytest.mark.integration


def test_fiftyone_heatmaps(registry, chelsea, tmp_path):
    chelsea.save(tmp_path / "chelsea.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(
        tmp_path / "noise.png")
    for seed in range(4):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(
            tmp_path / f"photo{seed}.png")
    # SALIENCY_SMALL_URL answers at most 150 KB: one 160x120 float32 map (~106 KB bound), not two; and its
    # requests cost at most one image's metrics (forwards_per_image): two images with metrics are too costly
    small_settings = Settings(max_wait_ms=5, max_response_bytes=150_000,
                              max_request_cost=2 * forwards_per_image(20) - 1)
    with (running_server(Settings(max_wait_ms=5), registry) as (base, _),
          running_server(small_settings, registry) as (small, _)):
        with Client(base) as c:
            np.save(tmp_path / "chelsea_gradcam.npy", c.explain(tmp_path / "chelsea.png")[0].map)
        run_inner_pytest("tests/integrations/fiftyone_checks.py",
                         {"SALIENCY_URL": base, "SALIENCY_SMALL_URL": small, "IMAGES_DIR": str(tmp_path)})
