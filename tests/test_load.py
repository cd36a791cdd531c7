"""1,000 requests from 64 concurrent clients, mixed methods: none lost, no 5xx, each answer its own
image's."""
from __future__ import annotations

import base64
import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.engine import explain
from service.methods import METHODS
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server

REQUESTS, CLIENTS = 1000, 64
MIX = [("gradcam", {}), ("gradient", {}), ("fullgrad", {}), ("smoothgrad", {"n_samples": 2}),
       ("integrated-gradients", {"n_steps": 4})]


def image(i: int) -> Image.Image:
    rng = np.random.default_rng(10_000 + i)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_thousand_requests_from_64_clients():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    model = registry.models["tiny_cnn"]
    settings = Settings(default_model="tiny_cnn", max_queue=32, max_wait_ms=5)
    local = threading.local()
    statuses: Counter = Counter()
    retry_afters = []

    def one(i: int):
        method, params = MIX[i % len(MIX)]
        client = getattr(local, "client", None) or httpx.Client(timeout=120)
        local.client = client
        while True:
            r = client.post(f"{base}/v1/explain/{method}",
                            files=[("image", ("x.png", png(image(i)), "image/png"))],
                            data={"size": "input", **{k: str(v) for k, v in params.items()}})
            statuses[r.status_code] += 1
            if r.status_code == 202:  # held as a job (a call its lane could not start in time): follow it
                return i, follow(client, r)
            if r.status_code != 429:
                return i, r
            retry_afters.append(int(r.headers["retry-after"]))
            time.sleep(0.05)  # the documented client behaviour is to wait Retry-After; kept short here

    def follow(client: httpx.Client, accepted: httpx.Response) -> httpx.Response:
        """The job's result as the call's answer (what the Python client does with a 202)."""
        while True:
            job = client.get(f"{base}{accepted.headers['location']}")
            if job.json()["status"] not in ("queued", "running"):
                result = job.json().get("result")
                return httpx.Response(200 if result else 500, json=result or job.json())
            time.sleep(0.1)

    with running_server(settings, registry) as (base, _):
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(one, range(REQUESTS)))
        assert httpx.get(f"{base}/healthz").status_code == 200

    assert len(answers) == REQUESTS
    assert not [s for s in statuses if s >= 500], statuses
    assert all(r.status_code == 200 for _, r in answers), statuses  # answered, or its job succeeded
    assert statuses[429] > 0 and min(retry_afters) >= 1, "the bounded queue should have pushed back"
    # Each response is its own image's: compare with the engine's direct result, per method in batches.
    for m, (method, params) in enumerate(MIX):
        ids = list(range(m, REQUESTS, len(MIX)))
        x = torch.stack([model.preprocess(image(i)) for i in ids])
        expected = explain(model, METHODS[method], x, [None] * len(ids), METHODS[method].Params(**params))
        for i, e in zip(ids, expected, strict=False):
            result = answers[i][1].json()["results"][0]
            got = np.load(io.BytesIO(base64.b64decode(result["map"]["npy"])))
            assert result["target"] == e.target
            np.testing.assert_allclose(got, e.heatmap.numpy(), atol=1e-4, err_msg=f"request {i} ({method})")
