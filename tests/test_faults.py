"""Faults inside the worker: OOM splits and retries, a failing item fails alone, a dead worker restarts."""
from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def server():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn", max_wait_ms=50, cache_bytes=0),
                        registry) as (base, app):
        yield base, app.state.runtime


def burst(base: str, n: int, seed0: int = 0):
    def one(i):
        return httpx.post(f"{base}/v1/explain/gradcam",
                          files=[("image", ("x.png", png(seed0 + i), "image/png"))],
                          data={"size": "input"}, timeout=60)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def heat(r) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(r.json()["results"][0]["map"]["npy"])))


def test_cuda_oom_splits_the_batch_and_retries(server):
    base, runtime = server
    reference = [heat(r) for r in burst(base, 8)]
    sizes = []

    def fake_oom(items):
        sizes.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    runtime.backend.fault_hook = fake_oom
    responses = burst(base, 8)
    assert all(r.status_code == 200 for r in responses)
    # a big batch was tried, then split
    assert max(sizes) > 2 and runtime.backend.lanes["interactive"].pool.stats.oom_splits > 0
    for r, expected in zip(responses, reference, strict=True):
        np.testing.assert_allclose(heat(r), expected, atol=1e-6)


def test_an_exception_fails_only_the_request_it_concerns(server):
    base, runtime = server
    poisoned = png(3)

    def poison(items):
        for item in items:
            image = item.payload.call.uploads[item.payload.index].image
            if image.tobytes() == Image.open(io.BytesIO(poisoned)).tobytes():
                raise RuntimeError("injected failure for one image")

    runtime.backend.fault_hook = poison
    responses = burst(base, 8)
    statuses = [r.status_code for r in responses]
    assert statuses[3] == 500 and "RuntimeError" in responses[3].json()["error"]["message"]
    assert statuses[:3] + statuses[4:] == [200] * 7


class WorkerCrash(BaseException):
    """Escapes the runner's error handling: kills the worker thread."""


def test_a_dead_worker_is_restarted_and_readyz_reflects_it(server):
    base, runtime = server
    # Pause the supervisor's watchdog so the dead state can be observed, then restart as its tick does
    # (tests/test_pool.py covers the watchdog thread itself).
    runtime.backend.lanes["interactive"].pool._watchdog_stop.set()
    crashed = []

    def crash_once(items):
        if not crashed:
            crashed.append(True)
            raise WorkerCrash()

    runtime.backend.fault_hook = crash_once
    r = httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("x.png", png(0), "image/png"))],
                   timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    deadline = time.monotonic() + 5
    # the thread is ending
    while runtime.backend.lanes["interactive"].pool.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(5):
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and r.json()["worker_alive"] is False
        time.sleep(0.05)
    r = httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("x.png", png(0), "image/png"))],
                   timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"]  # meanwhile callers are told to come back
    runtime.backend.lanes["interactive"].pool.ensure_alive()  # what the watchdog does on its next tick
    r = httpx.post(f"{base}/v1/explain/gradcam", files=[("image", ("x.png", png(0), "image/png"))],
                   timeout=30)
    assert r.status_code == 200 and runtime.backend.lanes["interactive"].pool.stats.restarts == 1
    assert httpx.get(f"{base}/readyz").status_code == 200
