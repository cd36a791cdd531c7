"""RSS after 1,000 requests stays within 1.2x of RSS after the first 10 (tiny model, cache off: a leak
test)."""
from __future__ import annotations

import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.metrics import rss_bytes
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server

METHODS = ["gradcam", "gradient", "fullgrad", "smoothgrad"]


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_rss_is_flat_over_1000_requests():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn", cache_bytes=0), registry) as (base, _):
        lock = threading.Lock()
        counter = iter(range(1000))
        readings = {}

        def client():
            with httpx.Client(timeout=60) as http:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    r = http.post(f"{base}/v1/explain/{METHODS[i % 4]}",
                                  data={"n_samples": "2"} if i % 4 == 3 else {},
                                  files=[("image", ("x.png", png(i), "image/png"))])
                    assert r.status_code == 200, r.text
                    if i in (10, 999):
                        readings[i] = rss_bytes()

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = rss_bytes()
    assert after <= 1.2 * readings[10], f"RSS {readings[10] / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB"
