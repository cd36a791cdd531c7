"""The job store's bounds: by count, by age and by the bytes of finished results (oldest finished first)."""
from __future__ import annotations

import time

import pytest

from service.api.errors import ApiError
from service.jobs import Job, JobStore, oldest_to_forget, payload_bytes


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
    with pytest.raises(ApiError, match="no job"):  # 300 bytes held: the oldest finished one goes
        store.get(old.id)
    assert store.get(middle.id) is middle and store.get(new.id) is new and store.get(running.id) is running
    huge = finished_job(10_000, now)
    store.add(huge)
    store.get(running.id)  # evicts: only the newest finished (huge, alone over the budget) and the running stay
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
