"""What bounds the detection calls waiting and running (service/detection/admission.py), as a lane's queue
bounds a classifier's. Oracles: the count of images admitted against `max_queue` (a call alone is always
admitted), the Retry-After from the passes admitted ahead at their recent seconds per pass, the release when
a call ends whatever its end; through the API, a full server answers 429 queue_full with Retry-After and
admits again once the call ahead is cancelled."""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.detection.admission import UNMEASURED_SECONDS_PER_PASS, DetectionAdmission
from service.errors import Busy
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server


def test_images_are_admitted_up_to_max_queue_and_the_wait_is_the_passes_ahead():
    admission = DetectionAdmission()
    rate = {("mtcnn", "drise"): 0.04}
    admission.admit("mtcnn", "drise", 2, 2 * 500, limit=3, seconds_per_pass=lambda *key: rate.get(key))
    admission.admit("frcnn", "gradcam", 1, 1, limit=3, seconds_per_pass=lambda *key: rate.get(key))
    with pytest.raises(Busy) as refused:
        admission.admit("mtcnn", "drise", 1, 500, limit=3, seconds_per_pass=lambda *key: rate.get(key))
    assert refused.value.retry_after == pytest.approx(1000 * 0.04 + 1 * UNMEASURED_SECONDS_PER_PASS)
    assert "hold 3 images and this one 1; the limit is 3 (setting max_queue)" in refused.value.message
    admission.release("mtcnn", "drise", 2, 1000)
    admission.admit("mtcnn", "drise", 2, 1000, limit=3, seconds_per_pass=lambda *key: None)
    assert admission.images == 3


def test_a_call_alone_is_admitted_whatever_its_size():
    admission = DetectionAdmission()
    admission.admit("mtcnn", "drise", 16, 16_000, limit=1, seconds_per_pass=lambda *_: None)
    with pytest.raises(Busy) as refused:
        admission.admit("mtcnn", "drise", 1, 10, limit=1, seconds_per_pass=lambda *_: None)
    assert refused.value.retry_after == pytest.approx(16_000 * UNMEASURED_SECONDS_PER_PASS)
    admission.release("mtcnn", "drise", 16, 16_000)
    assert admission.images == 0
    admission.admit("mtcnn", "drise", 1, 10, limit=1, seconds_per_pass=lambda *_: None)


def test_a_full_server_answers_429_with_retry_after_and_admits_again_once_the_call_ahead_ends():
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch: make venv installs it (--no-deps)")
    from skimage import data

    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"mtcnn", "tiny_cnn"})
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((256, 256)).save(buffer, "PNG")
    photo = buffer.getvalue()
    files = [("image", ("a.png", photo, "image/png"))]
    with running_server(Settings(default_model="tiny_cnn", max_queue=1), registry) as (base, _):
        ahead = httpx.post(f"{base}/v1/jobs", files=files, data={"model": "mtcnn", "method": "drise",
                                                                 "n_masks": "5000"}, timeout=60)
        assert ahead.status_code == 202, ahead.text
        refused = httpx.post(f"{base}/v1/explain/drise", files=files,
                             data={"model": "mtcnn", "n_masks": "16"}, timeout=60)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert "(setting max_queue)" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert httpx.delete(f"{base}/v1/jobs/{ahead.json()['id']}", timeout=30).status_code in (200, 202, 204)
        for _ in range(600):  # the running call stops at its next forward, then is counted out
            again = httpx.post(f"{base}/v1/explain/drise", files=files,
                               data={"model": "mtcnn", "n_masks": "16"}, timeout=120)
            if again.status_code != 429:
                break
            time.sleep(0.1)
        assert again.status_code == 200, again.text
        assert len(again.json()["results"][0]["detections"]) == 1
        assert np.isfinite(again.json()["results"][0]["detections"][0]["score"])
