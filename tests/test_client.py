"""The Python client (clients/python) against a real server on loopback."""
from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from saliency_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    DeadlineExceededError,
    JobFailedError,
    NotFoundError,
    RateLimitError,
    ValidationError,
)
from saliency_client import schemas as client_schemas
from service.api import schemas as server_schemas
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import free_port, running_server


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def noise(seed: int, size=(64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def server(registry):
    with running_server(Settings(max_wait_ms=20), registry) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    with Client(server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def small_registry():
    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})


def test_explain_accepts_paths_bytes_pil_and_arrays(client, chelsea, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(chelsea))
    result = client.explain([path, str(path), path.read_bytes(), chelsea, np.asarray(chelsea)], "gradcam",
                            outputs=["npy", "png", "overlay"])
    assert (result.model, result.method, len(result)) == ("efficientnet_lite0", "gradcam", 5)
    first = result[0]
    assert first.label == "Egyptian cat" and first.target == 285 and first.top_k[0].index == 285
    assert len(first.top_k) == 5 and 0.5 < first.probability <= 1
    assert first.map.dtype == np.float32 and first.map.shape == (300, 451) == (first.height, first.width)
    assert first.map.min() >= 0 and first.map.max() <= 1 and first.map.std() > 0.05
    assert first.overlay.size == first.png.size == (451, 300) and first.png.mode == "L"
    assert first.timing_ms.compute > 0
    for other in result.results[1:]:  # the same pixels whatever the input type
        np.testing.assert_allclose(other.map, first.map, atol=1e-5)


def test_explain_matches_the_raw_http_answer(client, server, chelsea):
    blob = png_bytes(chelsea)
    raw = httpx.post(f"{server}/v1/explain/integrated-gradients", timeout=120,
                     json={"images": [base64.b64encode(blob).decode()], "params": {"n_steps": 8}}).json()
    expected = np.load(io.BytesIO(base64.b64decode(raw["results"][0]["map"]["npy"])))
    got = client.explain(blob, "integrated-gradients", n_steps=8)
    assert got.params["n_steps"] == 8 and got[0].diagnostics == raw["results"][0]["diagnostics"]
    np.testing.assert_array_equal(got[0].map, expected)


def test_targets_model_and_size(client, chelsea):
    tabby = client.explain(chelsea, targets=281, outputs=["npy", "raw"], size="input")[0]
    assert tabby.target == 281 and tabby.label == "tabby" and tabby.map.shape == (224, 224)
    assert tabby.raw is not None and tabby.raw.dtype == np.float32  # gradcam: the layer-level CAM
    tiny = client.explain([noise(1), noise(2)], "gradient", model="tiny_cnn", targets=[3, None])
    assert tiny.model == "tiny_cnn" and tiny[0].target == 3 and tiny[1].target == tiny[1].top_k[0].index


def test_catalog_and_health(client):
    models = {m.name: m for m in client.models()}
    assert models["efficientnet_lite0"].default and models["efficientnet_lite0"].num_classes == 1000
    assert models["tiny_cnn"].input_size == [64, 64]
    methods = {m.name: m for m in client.methods()}
    assert {"gradcam", "integrated-gradients", "smoothgrad", "fullgrad", "moreaugrad",
            "gradient"} <= set(methods)
    assert methods["integrated-gradients"].parameters["properties"]["n_steps"]["default"] == 50
    assert client.health()["ready"] is True


def test_job_submit_wait_with_progress_and_cancel(client, capsys):
    job = client.submit(noise(3), "moreaugrad", model="tiny_cnn", iterations=40, n_samples=2)
    assert job.status in ("queued", "running") and job.progress.total == 40
    done = client.wait(job.id, progress=True)
    assert done.method == "moreaugrad" and done[0].map.shape == (64, 64)
    assert "40/40" in capsys.readouterr().err  # the tqdm bar reached the end
    assert client.job(job.id).status == "succeeded"

    slow = client.submit(noise(4), "moreaugrad", model="tiny_cnn", iterations=2000, n_samples=8)
    assert client.cancel(slow.id).id == slow.id
    with pytest.raises(JobFailedError) as failed:
        client.wait(slow.id, timeout=30)
    assert failed.value.job.status == "cancelled" and failed.value.job.progress.done < 2000


def test_errors_carry_the_server_message(client, server):
    with pytest.raises(NotFoundError, match="unknown method 'nosuch'") as e:
        client.explain(noise(5), "nosuch")
    assert e.value.status_code == 404 and e.value.code
    with pytest.raises(ValidationError) as e:
        client.explain(noise(5), "integrated-gradients", model="tiny_cnn", n_steps=-3)
    assert e.value.status_code == 422 and "n_steps" in e.value.message
    for bad, named in (({"size": "model"}, "(got 'model')"), ({"outputs": ["jpeg"]}, "jpeg")):
        with pytest.raises(ValidationError) as e:  # checked by the server, not by pydantic in the client
            client.explain(noise(5), "gradcam", model="tiny_cnn", **bad)
        assert e.value.status_code == 422 and e.value.code and named in e.value.message
    with pytest.raises(BadRequestError):
        client.explain(b"not an image", "gradcam")
    with pytest.raises(NotFoundError, match="no job"):
        client.job("0" * 32)
    with pytest.raises(TypeError):
        client.explain(3.5)
    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as dead, pytest.raises(APIConnectionError):
        dead.models()
    with Client(server, timeout=0.05) as hurried, pytest.raises(APITimeoutError):
        hurried.explain(noise(6), "moreaugrad", model="tiny_cnn", iterations=60, n_samples=4)


def test_slow_sync_call_is_followed_into_its_job(small_registry):
    with running_server(Settings(default_model="tiny_cnn", sync_wait_s=0.2), small_registry) as (base, _):
        with Client(base, poll_interval=0.05) as c:
            result = c.explain(noise(7), "moreaugrad", iterations=100, n_samples=4)  # the server answers 202
        assert result.method == "moreaugrad" and result[0].map.shape == (64, 64)


def test_a_call_timeout_bounds_the_job_it_became_and_cancels_it(small_registry):
    with (
        running_server(Settings(default_model="tiny_cnn", sync_wait_s=0.2), small_registry) as (base, app),
        Client(base, poll_interval=0.05) as c,
    ):
        started = time.monotonic()
        with pytest.raises(APITimeoutError, match="time limit"):
            c.explain(noise(7), "moreaugrad", iterations=2000, n_samples=32, timeout=1.5)
        took = time.monotonic() - started
        assert 1.0 <= took < 4.0  # the POST (0.2 s to its 202), then polls until the limit
        jobs = app.state.runtime.jobs.all()
        assert [j.status for j in jobs] == ["cancelled"]  # the server stopped the work the caller gave up


def test_ig_quadrature_method_goes_in_params(small_registry):
    """IG's own parameter `method` (the quadrature rule) shares its name with the client's argument."""
    with running_server(Settings(default_model="tiny_cnn"), small_registry) as (base, _), Client(base) as c:
        image = noise(14)
        rules = {rule: c.explain(image, "integrated-gradients", params={"method": rule, "n_steps": 8},
                                 outputs=["raw"])
                 for rule in ("gausslegendre", "riemann_left")}
        assert [r.params["method"] for r in rules.values()] == ["gausslegendre", "riemann_left"]
        assert not np.array_equal(rules["gausslegendre"][0].raw, rules["riemann_left"][0].raw)
        same = c.explain(image, "integrated-gradients", params={"method": "riemann_left"}, n_steps=8,
                         outputs=["raw"])  # keyword arguments and params= together
        np.testing.assert_array_equal(same[0].raw, rules["riemann_left"][0].raw)


def _recording_client(answer: httpx.Response, **kwargs) -> tuple[Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    return Client("http://saliency.test", transport=httpx.MockTransport(handle), **kwargs), seen


def test_caller_headers_join_the_client_own_and_numpy_targets_are_plain_ints():
    fail = httpx.Response(422, json={"error": {"code": "invalid_params", "message": "stop here"}})
    c, seen = _recording_client(fail, headers={"X-Trace": "abc"}, api_key="k" * 24)
    for targets in (np.int64(281), np.array([281, 3]), [np.int64(281), None]):
        with pytest.raises(ValidationError):
            c.explain([b"x", b"y"], "gradcam", targets=targets)
    request = seen[0]
    assert request.headers["x-trace"] == "abc" and request.headers["authorization"] == "Bearer " + "k" * 24
    import json
    assert [json.loads(r.content)["targets"] for r in seen] == [[281, 281], [281, 3], [281, None]]


def test_submit_names_the_method_in_the_body_of_post_v1_jobs():
    """POST /v1/jobs/{method} is deprecated; IG's own `method` parameter stays in `params`."""
    import json
    job = {"id": "j1", "method": "integrated-gradients", "model": "tiny_cnn", "status": "queued",
           "created": 0.0, "progress": {"done": 0, "total": 1}}
    c, seen = _recording_client(httpx.Response(202, json=job))
    assert c.submit(b"x", "integrated-gradients", params={"method": "riemann_left"}).id == "j1"
    (request,) = seen
    body = json.loads(request.content)
    assert (request.method, request.url.path) == ("POST", "/v1/jobs")
    assert body["method"] == "integrated-gradients" and body["params"] == {"method": "riemann_left"}


def test_a_job_that_missed_its_start_deadline_raises_what_the_call_would():
    """explain() followed a 202 into a job that then failed with deadline_exceeded: 504's error, not a
    job's."""
    job = {"id": "j1", "method": "gradcam", "model": "tiny_cnn", "status": "failed", "created": 0.0,
           "progress": {"done": 0, "total": 1},
           "error": {"code": "deadline_exceeded", "message": "work did not start within 30 s"}}
    answers = iter([httpx.Response(202, json={**job, "status": "queued", "error": None}),
                    httpx.Response(200, json=job)])
    c = Client("http://saliency.test", poll_interval=0.01,
               transport=httpx.MockTransport(lambda request: next(answers)))
    with pytest.raises(DeadlineExceededError, match="did not start") as e:
        c.explain(b"x", "gradcam")
    assert e.value.status_code == 504 and e.value.code == "deadline_exceeded"


def test_queue_full_raises_then_retry_honours_retry_after(small_registry):
    settings = Settings(default_model="tiny_cnn", max_queue=1, max_wait_ms=0)
    with running_server(settings, small_registry) as (base, app), Client(base, timeout=60) as c:
        runtime, release = app.state.runtime, threading.Event()
        # the worker holds its batch until released
        runtime.backend.fault_hook = lambda items: release.wait(30)
        held = c.submit(noise(8), "gradient")
        while not runtime.backend.lanes["interactive"].pool.running:
            time.sleep(0.01)
        queued = c.submit(noise(9), "gradient")  # fills the queue of one
        with pytest.raises(RateLimitError) as e:
            c.explain(noise(10), "gradient")
        assert e.value.status_code == 429 and e.value.code == "queue_full" and e.value.retry_after >= 1
        threading.Timer(0.3, release.set).start()
        started = time.monotonic()
        with Client(base, timeout=60, max_retries=5) as patient:
            result = patient.explain(noise(10), "gradient")
        assert result[0].map.shape == (64, 64) and time.monotonic() - started >= 1  # it slept Retry-After
        assert c.wait(held.id).method == c.wait(queued.id).method == "gradient"  # nothing lost


def test_api_key_is_sent(small_registry):
    key = "k" * 24
    with running_server(Settings(default_model="tiny_cnn", api_key=key), small_registry) as (base, _):
        with Client(base) as anonymous, pytest.raises(AuthenticationError) as e:
            anonymous.models()
        assert e.value.status_code == 401
        with Client(base, api_key=key) as c:
            assert c.explain(noise(13), "gradient")[0].map.shape == (64, 64)


def test_async_client(server, chelsea):
    async def run():
        async with AsyncClient(server) as c:
            results = await asyncio.gather(c.explain(chelsea),
                                           c.explain(noise(11), "gradient", model="tiny_cnn"), c.models())
            job = await c.submit(noise(12), "smoothgrad", model="tiny_cnn", n_samples=4)
            return results, await c.wait(job.id)

    (cat, tiny, models), job_result = asyncio.run(run())
    assert cat[0].label == "Egyptian cat" and tiny.model == "tiny_cnn" and len(models) >= 2
    assert job_result.params["n_samples"] == 4


def _shape(schema, drop=("description",)):
    """A JSON schema without prose (and any other `drop` keys), to compare structure only."""
    if isinstance(schema, dict):
        return {k: _shape(v, drop) for k, v in schema.items() if k not in drop}
    if isinstance(schema, list):
        return [_shape(v, drop) for v in schema]
    return schema


@pytest.mark.parametrize("model", client_schemas.WIRE_MODELS, ids=lambda m: m.__name__)
def test_wire_models_match_the_server(model):
    server_model = getattr(server_schemas, model.__name__)
    for mode in ("validation", "serialization"):
        assert _shape(model.model_json_schema(mode=mode)) == _shape(server_model.model_json_schema(mode=mode))


def test_wire_models_match_the_live_openapi(server):
    components = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]
    for model in client_schemas.WIRE_MODELS:
        if model.__name__ not in components:
            continue  # only schemas the server publishes (ExplainRequest is inlined in the request body)
        # FastAPI leaves `default: null` and some titles out of OpenAPI; names, types and required fields
        # must agree (the test above compares the defaults)
        drop = ("description", "default", "title")
        published = _shape(components[model.__name__], drop)
        ours = _shape(model.model_json_schema(mode="serialization",
                                              ref_template="#/components/schemas/{model}"), drop)
        ours.pop("$defs", None)
        assert published == ours, model.__name__
    assert {"ExplainResponse", "JobOut", "ModelOut", "MethodOut", "ErrorOut"} <= set(components)
