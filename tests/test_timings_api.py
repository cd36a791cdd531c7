"""GET /v1/timings: recent seconds per pass per model and method (what the viewer estimates a run's time
from), and the recorder behind it."""
from __future__ import annotations

import io

import httpx
import pytest

from service.settings import Settings
from service.timings import RecentTimings
from tests.server import running_server


def test_the_recorder_keeps_recent_images_and_skips_cache_hits():
    timings = RecentTimings(keep=2)
    timings.record("m", "a", 10, 1.0)
    timings.record("m", "a", 10, 3.0)
    timings.record("m", "a", 30, 3.0)  # the first image drops out of the window
    timings.record("m", "b", 1, 0.0)  # answered from the cache: no pass ran
    timings.record("m", "b", 0, 1.0)
    (rate,) = timings.rates()
    assert (rate.model, rate.method, rate.images) == ("m", "a", 2)
    assert rate.seconds_per_pass == pytest.approx(6.0 / 40)


@pytest.fixture(scope="module")
def server(registry):
    with running_server(Settings(max_wait_ms=5), registry) as (base, _):
        yield base


def test_timings_follow_the_answers(server, chelsea):
    empty = httpx.get(f"{server}/v1/timings")
    assert empty.status_code == 200
    body = empty.json()
    assert body["rates"] == [] and set(body["queue_s"]) == {"interactive", "bulk"}
    assert body["bulk_above_passes"] == Settings().bulk_cost

    photo = io.BytesIO()
    chelsea.save(photo, "JPEG")
    files = {"image": ("chelsea.jpg", photo.getvalue(), "image/jpeg")}
    fields = {"n_steps": "4", "size": "input"}
    assert httpx.post(f"{server}/v1/explain/integrated-gradients", files=files, data=fields,
                      timeout=120).status_code == 200
    (rate,) = httpx.get(f"{server}/v1/timings").json()["rates"]
    assert (rate["model"], rate["method"], rate["images"]) == ("efficientnet_lite0", "integrated-gradients",
                                                               1)
    assert 0 < rate["seconds_per_pass"] < 60
    # the same call again comes from the cache: no pass ran, nothing is added
    assert httpx.post(f"{server}/v1/explain/integrated-gradients", files=files, data=fields,
                      timeout=120).status_code == 200
    assert httpx.get(f"{server}/v1/timings").json()["rates"][0]["images"] == 1
    interactive = httpx.get(f"{server}/v1/timings").json()["queue_s"]["interactive"]
    assert interactive is not None and interactive >= 0  # a batch has been timed on that lane


def test_timings_are_in_the_schema_and_need_the_key(server, registry):
    operation = httpx.get(f"{server}/openapi.json").json()["paths"]["/v1/timings"]["get"]
    assert operation["operationId"] == "recent_timings"
    key = "t" * 24
    with running_server(Settings(api_key=key), registry) as (base, _):
        assert httpx.get(f"{base}/v1/timings").status_code == 401
        assert httpx.get(f"{base}/v1/timings", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_a_detection_image_counts_the_masks_it_used():
    """D-RISE's passes are the masks run (shared by the image's detections; fewer where early stop ended it),
    per-box Grad-CAM's one backward; an image with no detection ran none beyond its first forward."""
    import torch

    from service.detection.calls import passes_run
    from service.detection.explain import BOX_GRADCAM, DRISE, DetectionMap

    def found(n_masks: int) -> DetectionMap:
        return DetectionMap([0, 0, 1, 1], 0, "face", 0.9, torch.zeros(2, 2), {"n_masks": n_masks})

    assert passes_run(DRISE, [found(500), found(500)]) == 500
    assert passes_run(DRISE, [found(250)]) == 250
    assert passes_run(DRISE, []) == 0 and passes_run(BOX_GRADCAM, []) == 0
    assert passes_run(BOX_GRADCAM, [found(0), found(0)]) == 1
