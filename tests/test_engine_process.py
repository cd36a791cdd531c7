"""The engine in child processes (SALIENCY_WORKER=process): crashes, cancellation, errors across the pipe.

The whole API contract also runs against it (tests/test_api.py's `server` fixture); the maps it returns are
compared there and here with the engine run in this process.
"""
from __future__ import annotations

import base64
import io
import os
import pickle
import signal
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.backends import EmbeddedBackend
from service.engine import explain
from service.engine_process import pack, unpack
from service.errors import Busy, Cancelled, EngineOutOfMemory, Internal, InvalidInput, QueueFull, ServiceError
from service.methods import METHODS
from service.settings import Settings
from service.shared_arrays import ArrayReader, ArrayWriter
from service.worker.pool import default_is_oom
from tests.server import running_server


def png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    # MoreauGrad of more than 500 passes runs on the bulk lane
    settings = Settings(worker="process", models=["tiny_cnn"], default_model="tiny_cnn", cache_bytes=0,
                        max_wait_ms=20, bulk_cost=500)
    with running_server(settings) as (base, app):
        yield base, app.state.runtime


def post(base: str, method: str, blob: bytes, timeout: float = 60, **fields) -> httpx.Response:
    return httpx.post(f"{base}/v1/explain/{method}", files=[("image", ("x.png", blob, "image/png"))],
                      data={"size": "input", "outputs": "npy,raw", **fields}, timeout=timeout)


def start_job(base: str, seed: int, **fields) -> str:
    r = httpx.post(f"{base}/v1/jobs", data={"method": "moreaugrad", **fields},
                   files=[("image", ("x.png", png(seed), "image/png"))])
    assert r.status_code == 202, r.text
    return r.json()["id"]


def job_reaching(base: str, job_id: str, status: str, timeout: float = 60.0) -> dict:
    # a poll limit, not a speed check: it returns as soon as the job gets there (a loaded CI machine
    # took >10 s)
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if job["status"] == status or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def test_maps_equal_the_engine_run_in_this_process(server, registry):
    base, runtime = server
    lanes = runtime.backend.lanes
    assert runtime.backend.isolated and all(lane.engine.alive for lane in lanes.values())
    assert lanes["interactive"].engine.pid != os.getpid()
    model = registry.models["tiny_cnn"]
    blob = png(1)
    x = model.preprocess(Image.open(io.BytesIO(blob)).convert("RGB")).unsqueeze(0)
    for method, fields in (("gradcam", {}), ("integrated-gradients", {"n_steps": "8"}), ("fullgrad", {})):
        r = post(base, method, blob, **fields)
        assert r.status_code == 200, r.text
        got = r.json()["results"][0]
        params = METHODS[method].Params.model_validate({k: int(v) for k, v in fields.items()})
        want = explain(model, METHODS[method], x, [None], params)[0]
        assert got["target"] == want.target and got["label"] == want.label
        heat = np.load(io.BytesIO(base64.b64decode(got["map"]["npy"])))
        np.testing.assert_allclose(heat, want.heatmap.numpy(), atol=1e-5)
        raw = np.load(io.BytesIO(base64.b64decode(got["raw"])))
        np.testing.assert_allclose(raw, want.attribution.numpy(), rtol=1e-4, atol=1e-5)


def test_a_cancelled_job_stops_the_engine_process_which_stays_up(server):
    base, runtime = server
    pid = runtime.backend.lanes["bulk"].engine.pid
    job_id = start_job(base, 2, iterations="2000", n_samples="8")  # the bulk lane
    while httpx.get(f"{base}/v1/jobs/{job_id}").json()["progress"]["done"] < 5:  # progress crosses the pipe
        time.sleep(0.02)
    assert httpx.delete(f"{base}/v1/jobs/{job_id}").status_code == 200
    job = job_reaching(base, job_id, "cancelled")
    assert job["status"] == "cancelled" and job["progress"]["done"] < 2000
    # The child stopped at its next pass: the same process takes the next bulk job at once.
    job = job_reaching(base, start_job(base, 2, iterations="100", n_samples="8"), "succeeded")
    assert job["status"] == "succeeded" and runtime.backend.lanes["bulk"].engine.pid == pid


def test_a_killed_engine_process_fails_its_request_and_is_replaced(server):
    base, runtime = server
    engine = runtime.backend.lanes["bulk"].engine
    pid = engine.pid
    job_id = start_job(base, 3, iterations="2000", n_samples="8")
    while httpx.get(f"{base}/v1/jobs/{job_id}").json()["progress"]["done"] < 2:
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer, or a crash in native code, would
    job = job_reaching(base, job_id, "failed")
    assert job["status"] == "failed" and job["error"]["code"] == "engine_crashed"
    assert f"code {-signal.SIGKILL}" in job["error"]["message"]
    # the bulk lane: a new process takes it
    r = post(base, "moreaugrad", png(3), iterations="100", n_samples="8")
    assert r.status_code == 200, r.text
    assert engine.pid != pid and engine.restarts == 1
    metrics = httpx.get(f"{base}/metrics").text
    assert 'saliency_worker_restarts{worker="bulk-cpu"} 1.0' in metrics
    assert httpx.get(f"{base}/readyz").status_code == 200


def crossed(error: ServiceError) -> ServiceError:
    """As an error crosses the engine-process pipe and Ray (both pickle it)."""
    return pickle.loads(pickle.dumps(error))


def test_errors_cross_the_pipe_as_the_exceptions_the_pool_and_api_expect():
    invalid = crossed(InvalidInput("bad target", code="invalid_target"))
    assert isinstance(invalid, InvalidInput) and isinstance(invalid, ValueError)  # -> 422
    assert (invalid.code, invalid.message) == ("invalid_target", "bad target")
    oom = crossed(EngineOutOfMemory("CUDA out of memory"))
    assert isinstance(oom, EngineOutOfMemory) and default_is_oom(oom)  # -> the pool halves the batch
    assert isinstance(crossed(Cancelled()), Cancelled)
    assert type(crossed(Internal("boom"))) is Internal
    full = crossed(QueueFull(3.4))
    assert isinstance(full, Busy) and full.retry_after == 3.4 and full.code == "queue_full"


def test_a_registry_cannot_be_handed_to_a_process_worker(registry):
    with pytest.raises(ValueError, match="models_dir"):
        EmbeddedBackend(Settings(worker="process"), registry)


def test_auto_means_a_thread_on_the_cpu():
    assert EmbeddedBackend(Settings(worker="auto", device="cpu")).isolated is False


def test_shared_arrays_round_trip_grow_and_fall_back_to_the_pipe(monkeypatch):
    writer, reader = ArrayWriter("test"), ArrayReader()
    rng = np.random.default_rng(0)
    small = [rng.random((3, 5), dtype=np.float32), np.arange(7, dtype=np.int64), np.zeros((0, 4), np.float32)]
    first = pack(writer, small)
    assert first[0] == "shared"
    for got, want in zip(unpack(reader, first), small, strict=False):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    big = [rng.random((1200, 1200), dtype=np.float32) for _ in range(4)]  # 23 MB: a new, larger file
    second = pack(writer, big)
    assert second[1][0] != first[1][0] and not os.path.exists(first[1][0])
    for got, want in zip(unpack(reader, second), big, strict=False):
        np.testing.assert_array_equal(got, want)

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")  # as a full /dev/shm answers

    monkeypatch.setattr(os, "posix_fallocate", full)
    huge = [np.ones((3000, 3000), np.float32)] * 2
    inline = pack(writer, huge)
    assert inline[0] == "inline" and unpack(reader, inline)[0] is huge[0]
    writer.close()
    reader.close()
    assert not os.path.exists(second[1][0])
