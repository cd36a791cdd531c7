"""The job store's bounds: by count, by age and by the bytes of finished results (oldest finished first); and
the job routes' use of them."""
from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.errors import NotFound
from service.jobs import Job, JobStore, oldest_to_forget, payload_bytes
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server


def finished_job(map_chars: int, finished_at: float, raw_chars: int = 0) -> Job:
    job = Job(method="gradcam", model="tiny_cnn", total=[1])
    entry = {"map": {"height": 2, "width": 2, "npy": "A" * map_chars}}
    if raw_chars:
        entry["raw"] = "B" * raw_chars
    job.status, job.result, job.finished_at = "succeeded", {"results": [entry]}, finished_at
    return job


def test_payload_bytes_counts_the_encoded_maps_and_raw():
    assert payload_bytes(finished_job(100, time.time(), raw_chars=30).result) == 130
    assert payload_bytes(Job(method="gradcam", model="tiny_cnn", total=[1]).result) == 0  # not finished


def test_the_oldest_finished_results_go_first_past_the_byte_budget_and_the_newest_stays():
    store = JobStore(max_jobs=100, ttl=3600, max_result_bytes=250)
    now = time.time()
    old, middle, new = (finished_job(100, now - age) for age in (30, 20, 10))
    running = Job(method="gradcam", model="tiny_cnn", total=[1])
    for job in (old, middle, running, new):
        store.add(job)
    with pytest.raises(NotFound, match="no job"):  # 300 bytes held: the oldest finished one goes
        store.get(old.id)
    assert store.get(middle.id) is middle and store.get(new.id) is new and store.get(running.id) is running
    huge = finished_job(10_000, now)
    store.add(huge)
    # evicts: only the newest finished (huge, alone over the budget) and the running stay
    store.get(running.id)
    assert {job.id for job in store.all()} == {huge.id, running.id}


def test_no_byte_budget_keeps_results_until_their_ttl():
    store = JobStore(max_jobs=100, ttl=3600)
    jobs = [finished_job(10**6, time.time() - i) for i in range(5)]
    for job in jobs:
        store.add(job)
    assert len(store.all()) == 5


@pytest.mark.parametrize("sizes, budget, forget", [
    ([], 10, 0), ([5], 1, 0), ([5, 5, 5], 15, 0), ([5, 5, 5], 14, 1), ([5, 5, 5], 5, 2), ([5, 5, 5], 0, 2),
    ([1, 100], 50, 1),
])
def test_oldest_to_forget_keeps_the_rest_within_the_budget_and_never_the_newest(sizes, budget, forget):
    assert oldest_to_forget(sizes, budget) == forget


def test_reading_a_full_store_forgets_nothing_and_adding_forgets_the_oldest_finished():
    store = JobStore(max_jobs=2, ttl=3600)
    older, newer = finished_job(10, time.time() - 20), finished_job(10, time.time() - 10)
    store.add(older)
    store.add(newer)
    for _ in range(3):  # polling is not adding: both results stay readable
        assert store.get(older.id) is older and store.get(newer.id) is newer
    assert store.counts() == {"succeeded": 2}
    third = Job(method="gradcam", model="tiny_cnn", total=[1])
    store.add(third)  # room is made for it: the oldest finished job goes
    assert {job.id for job in store.all()} == {newer.id, third.id}


def test_a_job_refused_for_room_runs_nothing_and_delete_answers_cancelled():
    """Through the API: with max_jobs held, a submit is a 429 and its work never reaches the worker; a DELETE
    answers with the job as it ends (cancelled), not as it was a moment before."""
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    files = {"image": ("a.png", buf.getvalue(), "image/png")}
    slow = {"iterations": "2000", "n_samples": "16"}
    with running_server(Settings(default_model="tiny_cnn", max_jobs=1), registry) as (base, app):
        held = httpx.post(f"{base}/v1/jobs/moreaugrad", files=files, data=slow, timeout=30)
        assert held.status_code == 202
        refused = httpx.post(f"{base}/v1/jobs/smoothgrad", files=files, timeout=30)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
        cancelled = httpx.delete(f"{base}/v1/jobs/{held.json()['id']}", timeout=30)
        assert cancelled.json()["status"] == "cancelled"
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'saliency_batch_size_count{method="smoothgrad"}' not in metrics  # the refused call never ran
        again = httpx.post(f"{base}/v1/jobs/gradcam", files=files, timeout=30)  # the finished job makes room
        assert again.status_code == 202


def test_a_call_that_never_started_by_its_sync_wait_gets_its_504_not_a_202():
    """queue_deadline_s and sync_wait_s fall due together (both 30 s by default): the call is owed a 504."""
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "PNG")
    files = {"image": ("a.png", buf.getvalue(), "image/png")}
    settings = Settings(default_model="tiny_cnn", sync_wait_s=0.5, queue_deadline_s=0.5, max_wait_ms=0)
    with running_server(settings, registry) as (base, app):
        release = threading.Event()
        app.state.runtime.backend.fault_hook = lambda items: release.wait(30)  # the worker holds its batch
        try:
            held = httpx.post(f"{base}/v1/jobs/gradient", files=files, timeout=30)
            assert held.status_code == 202
            late = httpx.post(f"{base}/v1/explain/gradcam", files=files, timeout=30)
            assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded", late.text
        finally:
            release.set()
