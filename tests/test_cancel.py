"""Cancelling stops the work within one pass, for every method: after a job's DELETE, or when a synchronous
caller hangs up, the lane is free again (a Grad-CAM answers) within about two of the cancelled call's
passes. Before, only MoreauGrad stopped early: IG or SmoothGrad ran on for every remaining pass (issue 24,
finding 2)."""
from __future__ import annotations

import time

import httpx
import pytest

from service.settings import Settings
from tests.server import running_server
from tests.test_api import png_bytes, random_image

# SmoothGrad draws all its noise before its first pass (n_samples images' worth): 256 keeps that well under a
# pass's time while the passes still last many seconds
LONG = {"integrated-gradients": {"n_steps": "1024"}, "smoothgrad": {"n_samples": "256"}}


@pytest.fixture(scope="module")
def server(registry):
    settings = Settings(cache_bytes=0, models=["efficientnet_lite0"], retain_host_memory=False)
    with running_server(settings, registry) as (base, app):
        yield base, app


def image(seed: int) -> dict:
    return {"image": ("a.png", png_bytes(random_image(seed, size=(96, 96))), "image/png")}


def one_pass_s(base: str, app, method: str) -> float:
    """The compute of a call of one pass of this method (pass batch images), as the server times it."""
    per_pass = app.state.runtime.backend.core.pass_batch["efficientnet_lite0"]
    field = "n_steps" if method == "integrated-gradients" else "n_samples"
    r = httpx.post(f"{base}/v1/explain/{method}", files=image(0), data={field: str(per_pass)}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["timing_ms"]["compute"] / 1000


def gradcam_latency(base: str, seed: int) -> float:
    started = time.monotonic()
    r = httpx.post(f"{base}/v1/explain/gradcam", files=image(seed), timeout=120)
    assert r.status_code == 200, r.text
    return time.monotonic() - started


def wait_running(base: str, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.02)
    time.sleep(0.3)  # inside its passes


@pytest.mark.parametrize("method", sorted(LONG))
def test_deleting_a_running_job_frees_the_lane_within_a_pass(server, method):
    base, app = server
    per_pass = one_pass_s(base, app, method)
    idle = gradcam_latency(base, 1)
    r = httpx.post(f"{base}/v1/jobs", files=image(2), data={"method": method, **LONG[method]}, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_running(base, job_id)
    assert httpx.delete(f"{base}/v1/jobs/{job_id}").json()["status"] == "cancelled"
    waited = gradcam_latency(base, 3)
    # the pass under way finishes, then the Grad-CAM runs: generous for a loaded CI machine, and far below the
    # remaining passes (1024 images / the pass batch) that a lane without checkpoints would still run
    assert waited < idle + 2 * per_pass + 1.0, (waited, idle, per_pass)


def test_a_caller_who_hangs_up_frees_the_lane_within_a_pass(server):
    base, app = server
    per_pass = one_pass_s(base, app, "integrated-gradients")
    idle = gradcam_latency(base, 4)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/explain/integrated-gradients", files=image(5),
                   data=LONG["integrated-gradients"], timeout=1.5)
    # the server notices the hang-up at its next look (every 0.25 s), then the pass under way ends
    waited = gradcam_latency(base, 6)
    assert waited < idle + 2 * per_pass + 1.5, (waited, idle, per_pass)
