"""FiftyOne with a detection model (issue 27, item 5): MTCNN's D-RISE on skimage's astronaut stored as
fo.Detections (relative boxes, the detector's scores, an in-box salient mask each) and one fo.Heatmap field
per detection; checked with the real fiftyone package in .venv/tools
(tests/integrations/fiftyone_detection_checks.py)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.integrations.tools import run_inner_pytest
from tests.server import running_server

pytestmark = pytest.mark.integration
pytest.importorskip("facenet_pytorch", reason="facenet-pytorch: make venv installs it (--no-deps)")
data = pytest.importorskip("skimage.data")


def test_fiftyone_detections(tmp_path):
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"mtcnn", "tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _):
        run_inner_pytest("tests/integrations/fiftyone_detection_checks.py",
                         {"SALIENCY_URL": base, "IMAGES_DIR": str(tmp_path), "N_MASKS": "32"})
