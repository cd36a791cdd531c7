"""Admission keeps its promise (issue 24, finding 1): a call is queued only when its lane is expected to
start it before its start deadline, from the lane's measured seconds per pass and the passes queued ahead.
Otherwise a synchronous call becomes a job at once (202), and a job that could not start within the start
deadline of jobs gets a 429 whose Retry-After is computed from the same estimate. Before, both were queued
and failed at their deadline with a 504 (or a job that failed `deadline_exceeded`)."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from service.settings import Settings
from service.worker import Item, WorkerPool
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server
from tests.test_api import png_bytes, random_image

BATCH_S = 0.4  # each batch's injected duration: one image per batch, one pass per Grad-CAM image


@pytest.fixture(scope="module")
def small_registry():
    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})


def files(n: int, seed: int = 0) -> list:
    return [("image", (f"{i}.png", png_bytes(random_image(seed + i)), "image/png")) for i in range(n)]


def backlog(base: str, app, images: int) -> str:
    """Time one batch (the lane's rate), then queue a job of `images` Grad-CAM images, BATCH_S each, on the
    interactive lane; returns its id."""
    app.state.runtime.backend.fault_hook = lambda items: time.sleep(BATCH_S)
    assert httpx.post(f"{base}/v1/explain/gradcam", files=files(1, 90), timeout=30).status_code == 200
    r = httpx.post(f"{base}/v1/jobs", files=files(images, 100), data={"method": "gradcam"}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_done(base: str, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (job := httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json())["status"] in ("queued",
                                                                                          "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_a_sync_call_that_would_start_past_its_deadline_is_a_job_at_once(small_registry):
    settings = Settings(default_model="tiny_cnn", queue_deadline_s=1.0, max_batch_items=1, cache_bytes=0)
    with running_server(settings, small_registry) as (base, app):
        ahead = backlog(base, app, 8)  # ~3 s of passes ahead, three times the start deadline
        started = time.monotonic()
        r = httpx.post(f"{base}/v1/explain/gradcam", files=files(1, 200), timeout=30)
        answered = time.monotonic() - started
        assert r.status_code == 202, r.text  # before: queued, and a 504 at its deadline
        assert answered < 0.8 * settings.queue_deadline_s  # at once, not after waiting for its deadline
        assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        job = wait_done(base, r.json()["id"])
        assert job["status"] == "succeeded", job  # it runs after the backlog: jobs start within an hour
        assert len(job["result"]["results"]) == 1
        assert wait_done(base, ahead)["status"] == "succeeded"


def test_a_call_the_lane_can_start_in_time_is_answered_as_before(small_registry):
    settings = Settings(default_model="tiny_cnn", queue_deadline_s=5.0, max_batch_items=1, cache_bytes=0)
    with running_server(settings, small_registry) as (base, app):
        ahead = backlog(base, app, 3)  # ~1.2 s ahead: well within the 5 s deadline
        r = httpx.post(f"{base}/v1/explain/gradcam", files=files(1, 200), timeout=30)
        assert r.status_code == 200, r.text
        assert wait_done(base, ahead)["status"] == "succeeded"


def test_a_job_that_could_not_start_within_the_job_deadline_gets_429_with_the_estimated_retry(
        small_registry):
    settings = Settings(default_model="tiny_cnn", job_deadline_s=1.0, max_batch_items=1, cache_bytes=0)
    with running_server(settings, small_registry) as (base, app):
        # the backlog's own job is admitted: nothing queued ahead of it yet
        ahead = backlog(base, app, 10)  # ~4 s ahead
        r = httpx.post(f"{base}/v1/jobs", files=files(1, 200), data={"method": "gradcam"}, timeout=30)
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error["code"] == "overloaded" and "start deadline" in error["message"], error
        # Retry-After: when the call would start within its deadline, about 4 s - 1 s
        assert 1 <= int(r.headers["retry-after"]) <= 5, r.headers["retry-after"]
        job_count = sum(1 for _ in app.state.runtime.jobs.all())
        assert job_count == 1  # the refused call holds no job and queued no work
        assert wait_done(base, ahead)["status"] == "succeeded"


def test_the_pool_estimates_the_start_from_the_passes_ahead_and_the_batch_in_flight():
    release = threading.Event()
    durations = iter([0.2, None, None])

    def runner(items: list[Item]) -> list[int]:
        seconds = next(durations)
        if seconds is None:
            release.wait(10)
        else:
            time.sleep(seconds)
        return [0] * len(items)

    pool = WorkerPool(runner, max_queue=10, max_cost=100, max_items=1, max_wait=0)
    pool.start()
    try:
        def item(passes: int) -> Item:
            return Item(key="k", cost=1, passes=passes, payload=None, deadline=time.monotonic() + 60)

        assert pool.start_estimate() is None  # nothing timed yet: no estimate
        pool.submit(item(4)).result(5)  # ~0.2 s for 4 passes
        rate = pool._recent[-1][1] / 4  # seconds a pass, as measured (longer on a loaded machine)
        pool.submit(item(40))  # now running (held): 40 passes' time expected
        while not pool.running:
            time.sleep(0.005)
        pool.submit(item(20))  # queued: 20 passes
        estimate = pool.start_estimate()
        assert estimate is not None and 20 * rate < estimate <= 60 * rate + 0.01, (estimate, rate)
        time.sleep(0.3)  # the batch in flight is expected to end sooner now
        later = pool.start_estimate()
        assert later is not None and later < estimate - 0.25, (estimate, later)
    finally:
        release.set()
        pool.stop(5)
