"""The viewer with a real detector (issue 27's viewer view, issue 28 point 6): MTCNN and D-RISE from the form,
end to end in Chromium. Choosing the detector leaves only its methods tickable (the classifier methods greyed
out with the reason from GET /v1/models); its answer draws the face's box over the astronaut, and the box's
map is shown."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server
from tests.viewer_page import ARTIFACTS, card, open_viewer, save_jpeg, save_screenshot, set_param

pytestmark = [pytest.mark.slow, pytest.mark.browser]
pytest.importorskip("facenet_pytorch", reason="facenet-pytorch: make venv installs it (--no-deps)")
data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def server():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"mtcnn", "tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn", max_wait_ms=5), registry) as (base, app):
        yield base


def test_a_detector_is_explained_with_drise_from_the_form(browser, server, tmp_path):
    photo = save_jpeg(Image.fromarray(data.astronaut()), tmp_path / "astronaut.jpg")
    context, page = open_viewer(browser, server)
    try:
        page.select_option("#model-select", "mtcnn")
        assert page.is_disabled("#method-gradcam") and not page.is_disabled("#method-drise")
        assert "object detector" in page.text_content("[data-method='gradcam'] .not-applicable")
        page.set_input_files("#image-input", str(photo))
        page.wait_for_selector("#preview:not([hidden])")
        page.check("#method-drise")
        set_param(page, "drise", "n_masks", "32")
        page.click("#run-button")
        page.wait_for_selector(f"{card('drise')}[data-state='done']", timeout=300_000)
        boxes = f"{card('drise')} svg.boxes"
        assert page.locator(f"{boxes} g.box").count() == 1
        assert page.locator(f"{card('drise')} .detections button").all_text_contents()[0].startswith("face")
        assert "box 1 of 1: face" in page.text_content(f"{card('drise')} .card-context")
        assert page.errors == []
        save_screenshot(page, ARTIFACTS / "viewer-detection-mtcnn.png", full_page=False)
    finally:
        context.close()
