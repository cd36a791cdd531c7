"""The job store's bounds: by count, by age and by the bytes of finished results (oldest finished first); the
job routes' use of them; and submitting a job, its method named by the body (POST /v1/jobs) or, deprecated,
by the path (POST /v1/jobs/{method})."""
from __future__ import annotations

import base64
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
from service.methods import METHODS
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
        held = httpx.post(f"{base}/v1/jobs", files=files, data={"method": "moreaugrad", **slow}, timeout=30)
        assert held.status_code == 202
        refused = httpx.post(f"{base}/v1/jobs", files=files, data={"method": "smoothgrad"}, timeout=30)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
        cancelled = httpx.delete(f"{base}/v1/jobs/{held.json()['id']}", timeout=30)
        assert cancelled.json()["status"] == "cancelled"
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'saliency_batch_size_count{method="smoothgrad"}' not in metrics  # the refused call never ran
        # the finished job makes room
        again = httpx.post(f"{base}/v1/jobs", files=files, data={"method": "gradcam"}, timeout=30)
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
            held = httpx.post(f"{base}/v1/jobs", files=files, data={"method": "gradient"}, timeout=30)
            assert held.status_code == 202
            late = httpx.post(f"{base}/v1/explain/gradcam", files=files, timeout=30)
            assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded", late.text
        finally:
            release.set()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _):
        yield base


def finished(base: str, r: httpx.Response) -> dict:
    """The job a 202 started, polled until it ends."""
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    deadline = time.monotonic() + 60  # a poll limit, not a speed check
    while True:
        job = httpx.get(f"{base}{r.headers['location']}", timeout=30).json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_post_v1_jobs_takes_the_method_from_the_body(served, form):
    if form == "multipart":
        r = httpx.post(f"{served}/v1/jobs", data={"method": "integrated-gradients", "n_steps": "4"},
                       files={"image": ("a.png", png(1), "image/png")}, timeout=30)
    else:
        r = httpx.post(f"{served}/v1/jobs", timeout=30, json={
            "method": "integrated-gradients", "images": [base64.b64encode(png(1)).decode()],
            "params": {"n_steps": 4}})
    assert "deprecation" not in r.headers
    job = finished(served, r)
    assert job["status"] == "succeeded" and job["method"] == "integrated-gradients"
    assert job["result"]["params"]["n_steps"] == 4 and job["result"]["results"][0]["map"]["npy"]


def test_a_parameter_named_method_goes_as_params_method_in_a_job_form(served):
    """Integrated Gradients' own `method` (its quadrature rule) cannot be the form's `method` field, which
    names the job's method: `params.NAME` gives any parameter by its name."""
    r = httpx.post(f"{served}/v1/jobs", files={"image": ("a.png", png(2), "image/png")}, timeout=30,
                   data={"method": "integrated-gradients", "params.method": "riemann_left", "n_steps": "4"})
    job = finished(served, r)
    assert job["status"] == "succeeded" and job["result"]["params"]["method"] == "riemann_left"


def test_where_the_path_names_the_method_a_form_method_field_is_still_a_parameter(served):
    """/v1/explain/{method} is unchanged: the field `method` is IG's rule there (refused here for 1 step)."""
    for field in ("method", "params.method"):
        r = httpx.post(f"{served}/v1/explain/integrated-gradients", timeout=30,
                       files={"image": ("a.png", png(3), "image/png")},
                       data={field: "riemann_left", "n_steps": "1"})
        assert r.status_code == 422 and "at least 2 for riemann_left" in r.json()["error"]["message"], r.text


def test_a_json_method_field_is_refused_where_the_path_names_the_method(served):
    r = httpx.post(f"{served}/v1/explain/gradcam", timeout=30,
                   json={"method": "gradient", "images": [base64.b64encode(png(4)).decode()]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_field"
    assert "the path '/v1/explain/gradcam' names the method" in r.json()["error"]["message"]


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_a_job_without_its_method_is_a_422_naming_the_field_and_an_unknown_one_a_404(served, form):
    def submit(**method):
        if form == "multipart":
            return httpx.post(f"{served}/v1/jobs", data=method, timeout=30,
                              files={"image": ("a.png", png(5), "image/png")})
        return httpx.post(f"{served}/v1/jobs", json={**method, "images": [base64.b64encode(png(5)).decode()]},
                          timeout=30)

    for missing in (submit(), submit(method="")):
        assert missing.status_code == 422, missing.text
        code, message = missing.json()["error"]["code"], missing.json()["error"]["message"]
        assert code == "missing_method"
        assert "the job's method is missing: give the field 'method'" in message
        assert all(name in message for name in METHODS)
    unknown = submit(method="nosuch")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_method", unknown.text
    assert "unknown method 'nosuch'" in unknown.json()["error"]["message"]


def test_a_json_method_must_be_a_name(served):
    r = httpx.post(f"{served}/v1/jobs", timeout=30,
                   json={"method": ["gradcam"], "images": [base64.b64encode(png(6)).decode()]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid", r.text


DEPRECATED = {"deprecation": "true", "link": '</v1/jobs>; rel="successor-version"'}


def test_the_deprecated_route_still_submits_and_says_it_is_deprecated(served):
    r = httpx.post(f"{served}/v1/jobs/gradient", files={"image": ("a.png", png(7), "image/png")}, timeout=30)
    assert {k: r.headers.get(k) for k in DEPRECATED} == DEPRECATED
    job = finished(served, r)
    assert job["status"] == "succeeded" and job["method"] == "gradient"
    json_form = httpx.post(f"{served}/v1/jobs/gradient", timeout=30,
                           json={"images": [base64.b64encode(png(7)).decode()]})
    assert finished(served, json_form)["status"] == "succeeded"


def test_every_answer_of_the_deprecated_route_says_so_errors_too(served):
    files = {"image": ("a.png", png(8), "image/png")}
    unknown = httpx.post(f"{served}/v1/jobs/nosuch", files=files, timeout=30)
    refused = httpx.post(f"{served}/v1/jobs/gradcam", files=files, data={"colour": "red"}, timeout=30)
    bad_type = httpx.post(f"{served}/v1/jobs/gradcam", content=b"x", headers={"content-type": "text/plain"},
                          timeout=30)
    for r, status in ((unknown, 404), (refused, 422), (bad_type, 415)):
        assert r.status_code == status, r.text
        assert {k: r.headers.get(k) for k in DEPRECATED} == DEPRECATED, r.headers
    # GET and DELETE /v1/jobs/{job_id} are not deprecated, though they share the path's shape
    assert "deprecation" not in httpx.get(f"{served}/v1/jobs/nosuch", timeout=30).headers
