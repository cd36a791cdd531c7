from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
# The browser tests (tests/test_viewer.py, tests/test_docs_offline.py) drive Debian's chromium with
# Playwright.
CHROMIUM = os.environ.get("SALIENCY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# The shipped cards the suite was written against (lite1/2 in test_lite_models, detectors in test_detection_*)
SUITE_MODELS = ["efficientnet_lite0", "tiny_cnn", "resnet50"]


@pytest.fixture(scope="session")
def registry():
    from service.zoo import ModelRegistry

    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only=set(SUITE_MODELS))


@pytest.fixture(scope="session")
def default_model(registry):
    return registry.models["efficientnet_lite0"]


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())


@pytest.fixture(scope="session")
def chelsea_batch(default_model, chelsea) -> torch.Tensor:
    return default_model.preprocess(chelsea).unsqueeze(0)


@pytest.fixture(scope="session")
def ray_server():
    """One local Ray and one Serve app for the whole session (Ray takes ~10 s to start, Serve ~30 s more)."""
    pytest.importorskip("ray.serve", reason="ray is not installed: pip install '.[ray]' (make test does)")
    import ray

    from service.settings import Settings
    from tests.ray_server import running_ray_server, start_ray

    start_ray()
    try:
        # every call computes (no cache); the suite's models only: each card is an explainer replica, and
        # the ingress loads and self-tests every card too
        settings = Settings(max_wait_ms=20, cache_bytes=0, models=SUITE_MODELS)
        with running_ray_server(settings) as server:
            yield server
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    """A headless chromium (skipped, saying why, without playwright or chromium)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (make test installs it with the test extra)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: install Debian's (apt-get install chromium; make test does "
                    "when CI=true) or point SALIENCY_TEST_CHROMIUM at one")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio (.venv/tools) for tests/test_labelstudio*.py, started once for the session: its
    first start runs the migrations, which took over 300 s on the project's shared 2-core machine loaded."""
    import secrets
    import time

    from tests.integrations.tools import PYTHON, process, require_tools
    from tests.server import free_port

    require_tools()
    data, port, token = tmp_path_factory.mktemp("label-studio"), free_port(), secrets.token_hex(20)
    env = {"LABEL_STUDIO_USERNAME": "admin@example.com", "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
           "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_BASE_DATA_DIR": str(data),
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # 1.23 turns `Token` auth off by default
           # test only: let it call a backend on 127.0.0.1 (its SSRF guard refuses loopback by default)
           "ML_BLOCK_LOCAL_IP": "false", "USE_DEFAULT_BANNED_SUBNETS": "false", "DJANGO_DB": "sqlite"}
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with process([str(PYTHON.with_name("label-studio")), "start", "--no-browser", "--host", "127.0.0.1",
                  "--port", str(port), "--data-dir", str(data)], env, data / "label-studio.log",
                 f"{url}/health", 900):
        print(f"Label Studio up in {time.monotonic() - started:.1f}s")
        yield url, token


@pytest.fixture(scope="session")
def detector_server():
    """A server with the MTCNN face detector beside the tiny classifier (the default), for the detection
    tests of the API, the client and the labeling tools, started once."""
    from service.settings import Settings
    from service.zoo import ModelRegistry
    from tests.server import running_server

    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"mtcnn", "tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _):
        yield base
