"""RSS after 1,000 requests stays within 1.2x of RSS after the first 10 (tiny model, cache off: a leak
test)."""
from __future__ import annotations

import gc
import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.metrics import rss_bytes
from service.pipeline import Call
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


def flat_png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


# Issue 24, finding 3: every finished call sat in a reference cycle, so its decoded images, its maps and its
# encoded answer waited for a full collection of the cyclic GC: Runtime._encoded's `chain` callback closed
# over its item, whose future keeps the callback for good, and CallItem.siblings held the call's items, each
# of which held it (service/runtime.py breaks both; docs/architecture.md, "A call's memory").


def test_rss_is_flat_across_large_answers():
    """Ten calls, each answered with a 12 MP photo's map as float32 .npy at its original size (64 MB of JSON,
    within max_response_bytes): RSS after the last stays within 150 MiB of RSS after the first two, the result
    cache's growth counted (it holds each result's map at the photo's size). Before the fix a call's objects
    (its decoded photo, its maps, its answer) were freed only by a full collection of the cyclic GC
    (the cycle above): RSS grew by 638 MiB over these ten calls, 501 beyond the cache's growth."""
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    blobs = [flat_png(4000, 3000, (20 * i, 100, 200 - i)) for i in range(10)]  # distinct: no cache hits
    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, app):
        cache = app.state.runtime.cache
        readings = []
        with httpx.Client(timeout=120) as http:
            for blob in blobs:
                with http.stream("POST", f"{base}/v1/explain/gradient", data={"size": "original"},
                                 files=[("image", ("x.png", blob, "image/png"))]) as r:
                    if r.status_code != 200:
                        pytest.fail(f"{r.status_code}: {r.read()[:500]!r}")
                    received = sum(len(chunk) for chunk in r.iter_raw())  # read and dropped: the server's RSS
                assert received > 64_000_000
                readings.append((rss_bytes(), cache.bytes))
    (rss, cached), (last_rss, last_cached) = readings[1], readings[-1]
    grown = last_rss - rss - (last_cached - cached)
    trace = ", ".join(f"{r / 2**20:.0f}" for r, _ in readings)
    assert grown <= 150 * 2**20, f"RSS after each call (MiB): {trace}; cache {cached / 2**20:.0f} -> " \
                                 f"{last_cached / 2**20:.0f} MiB"


def test_a_finished_call_is_freed_by_reference_counting():
    """A call's objects go when its answer is sent, not at the cyclic GC's next full collection: with torch's
    ~500k objects in the process those come seldom, and large answers piled up meanwhile."""
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with (running_server(Settings(default_model="tiny_cnn"), registry) as (base, _),
          httpx.Client(timeout=60) as http):
        def explain(i: int) -> None:
            r = http.post(f"{base}/v1/explain/gradient", data={"size": "original", "outputs": "npy,overlay"},
                          files=[("image", ("x.png", png(i), "image/png"))])
            assert r.status_code == 200, r.text

        def live_calls() -> int:
            return sum(type(o) is Call for o in gc.get_objects())  # isinstance would trip deprecation proxies

        explain(0)
        gc.collect()
        gc.disable()  # whatever is freed from here on is freed by reference counting
        try:
            for i in range(1, 5):
                explain(i)
            deadline = time.monotonic() + 5  # the server thread may still be finishing the last call
            while (live := live_calls()) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            gc.enable()
    # the lane's thread keeps its last batch (one call here) until it takes the next
    assert live <= 1, f"{live} finished calls are still held, waiting for the cyclic GC"
