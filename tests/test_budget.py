"""The in-flight pixel budget: calls beyond it get 429, the pixels come back when the worker is done with a
call's images (finished, failed or cancelled), and a call alone is always admitted."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.budget import PixelBudget
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server


def test_a_call_beyond_the_budget_is_refused_and_a_call_alone_is_admitted():
    budget = PixelBudget(100)
    assert budget.hold(500)  # alone: admitted whatever its size
    assert not budget.hold(1)
    budget.release(500)
    assert budget.hold(60) and budget.hold(40) and not budget.hold(1)
    assert budget.held == 100


def test_pixels_come_back_when_every_future_is_done_however_it_ends():
    budget = PixelBudget(100)
    futures = [Future() for _ in range(3)]
    assert budget.hold(90)
    budget.release_when_done(90, futures)
    futures[0].set_result("map")
    futures[1].set_exception(RuntimeError("failed"))
    assert budget.held == 90
    futures[2].cancel()
    assert budget.held == 0
    assert budget.hold(30)
    budget.release_when_done(30, [])  # nothing to wait for (no images): released at once
    assert budget.held == 0


def png(side: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3),
                                                         dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def server():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    settings = Settings(default_model="tiny_cnn", cache_bytes=0, max_pixels_in_flight=15_000)
    with running_server(settings, registry) as (base, app):
        yield base, app.state.runtime


def post(base: str, blob: bytes) -> httpx.Response:
    return httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("x.png", blob, "image/png"))],
                      timeout=60)


def test_the_server_refuses_pixels_beyond_its_budget_while_a_call_runs(server):
    base, runtime = server
    entered, release = threading.Event(), threading.Event()

    def hold_the_worker(items):
        entered.set()
        release.wait(30)

    runtime.backend.fault_hook = hold_the_worker
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, base, png(100, 0))  # 10,000 pixels, running
        assert entered.wait(30)
        refused = post(base, png(80, 1))  # 6,400 more: over 15,000
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and "hold 10000 pixels" in error["message"]
        assert "limit is 15000" in error["message"]
        fits = pool.submit(post, base, png(50, 2))  # 2,500 more: admitted, queued behind the first
        deadline = time.monotonic() + 30
        while runtime.pixels_in_flight.held != 12_500 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime.pixels_in_flight.held == 12_500
        release.set()
        assert first.result().status_code == 200 and fits.result().status_code == 200
    runtime.backend.fault_hook = None
    assert post(base, png(80, 1)).status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    assert "saliency_pixels_in_flight 0.0" in metrics
    assert runtime.pixels_in_flight.held == 0
