"""A model's sanity report through the API (issue 25): POST /v1/models/{name}/sanity starts it as a job, GET
reads the newest finished one, /v1/models shows the verdicts; kept per weights, profile, seed and methods;
cancellable within a pass, bounded by a deadline and by the number queued; every bad request a clear 4xx.

Oracle: the report served equals service/evidence/sanity.py's `sanity_report` run directly on the same model,
photos, parameters and seed, and a model-free Sobel map registered by the test fails while the gradient passes
(tests/test_evidence_sanity.py holds the math's own oracles)."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from service.evidence.sanity import profile_params, sanity_report, shipped_photos
from service.methods import get_method, register_method, unregister_method
from service.methods.gradient import Gradient
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server
from tests.test_evidence_sanity import EdgeDetector

TIMEOUT = 120


class SlowGradient(Gradient):
    """The gradient, after `steps` progress reports 0.1 s apart (a long method to cancel)."""

    name = "test-slow-gradient"
    iterative = True

    def __init__(self):
        self.reports = 0
        self.lock = threading.Lock()

    def attribute(self, model, x, targets, params, progress=None):
        for step in range(20):
            if progress is not None:
                progress(step, 20)
            with self.lock:
                self.reports += 1
            time.sleep(0.1)
        return super().attribute(model, x, targets, params, progress)


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})


@pytest.fixture(scope="module")
def methods():
    edges, slow = register_method(EdgeDetector()), register_method(SlowGradient())
    try:
        yield edges, slow
    finally:
        unregister_method(EdgeDetector.name)
        unregister_method(SlowGradient.name)


@pytest.fixture(scope="module")
def server(registry, methods):
    with running_server(Settings(default_model="tiny_cnn", max_sanity_jobs=2), registry) as (base, app):
        yield base, app


def follow(base: str, job_id: str, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def start(base: str, body: dict | None = None, model: str = "tiny_cnn") -> httpx.Response:
    return httpx.post(f"{base}/v1/models/{model}/sanity", json=body, timeout=30)


def test_a_report_is_a_job_and_equals_the_report_run_directly(server, registry):
    base, _ = server
    names = [EdgeDetector.name, "gradient", "gradcam"]
    assert httpx.get(f"{base}/v1/models/tiny_cnn/sanity", timeout=30).status_code in (200, 404)

    r = start(base, {"methods": names, "seed": 3})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert r.json()["method"] == "sanity" and r.json()["model"] == "tiny_cnn"
    job = follow(base, r.json()["id"])
    assert job["status"] == "succeeded", job
    report = job["result"]
    assert job["progress"]["done"] == job["progress"]["total"] == 3 * (4 + 2)  # tiny_cnn: 4 levels

    model = registry.models["tiny_cnn"]
    x = torch.stack([model.preprocess(p) for p in shipped_photos()])
    chosen = [get_method(n) for n in names]
    direct = sanity_report(model, chosen, x, params={m.name: profile_params(m) for m in chosen}, seed=3)
    assert report["model"] == "tiny_cnn" and report["images"] == 4 and report["seed"] == 3
    assert report["profile"] == "quick" and len(report["weights_sha256"]) == 64
    assert report["photos"] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    for name in names:
        served, expected = report["methods"][name], direct["methods"][name]
        assert served["verdict"] == expected["verdict"] and served["reason"] == expected["reason"]
        assert [lv["spearman"] for lv in served["levels"]] == pytest.approx(
            [lv["spearman"] for lv in expected["levels"]], abs=1e-6)
        assert served["levels"][0]["layers"] == expected["levels"][0]["layers"]
    assert report["methods"][EdgeDetector.name]["verdict"] == "fail"  # the model-free map is flagged
    assert report["methods"]["gradient"]["verdict"] == "pass"

    got = httpx.get(f"{base}/v1/models/tiny_cnn/sanity", timeout=30)
    assert got.status_code == 200 and got.json() == report
    listed = {m["name"]: m for m in httpx.get(f"{base}/v1/models", timeout=30).json()}
    summary = listed["tiny_cnn"]["sanity"]
    assert summary["status"] == "done" and summary["job_id"] == job["id"]
    assert summary["methods"][EdgeDetector.name]["verdict"] == "fail"
    assert summary["methods"]["gradient"] == {"verdict": "pass",
                                              "reason": report["methods"]["gradient"]["reason"]}

    # the same ask again: answered from the kept report, a job finished at once; refresh computes anew
    again = start(base, {"methods": names, "seed": 3})
    assert again.status_code == 202 and again.json()["status"] == "succeeded"
    assert again.json()["id"] != job["id"] and again.json()["result"] == report
    fresh = start(base, {"methods": names, "seed": 3, "refresh": True})
    assert fresh.status_code == 202 and fresh.json()["status"] in ("queued", "running")
    assert follow(base, fresh.json()["id"])["result"]["methods"].keys() == report["methods"].keys()


def test_asking_twice_while_it_runs_gives_the_same_job_and_a_third_report_is_refused(server, methods):
    base, _ = server
    first = start(base, {"methods": [SlowGradient.name], "seed": 11})
    same = start(base, {"methods": [SlowGradient.name], "seed": 11})
    assert first.status_code == same.status_code == 202 and same.json()["id"] == first.json()["id"]
    second = start(base, {"methods": [SlowGradient.name], "seed": 12})
    assert second.status_code == 202, second.text
    third = start(base, {"methods": [SlowGradient.name], "seed": 13})  # max_sanity_jobs=2 queued or running
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_sanity_jobs"
    assert int(third.headers["retry-after"]) > 0
    for job in (first, second):
        assert httpx.delete(f"{base}/v1/jobs/{job.json()['id']}", timeout=30).json()["status"] == "cancelled"


def test_a_cancelled_report_stops_within_a_pass_and_serving_goes_on(server, methods):
    base, _ = server
    _, slow = methods
    r = start(base, {"methods": [SlowGradient.name], "seed": 21})
    job_id = r.json()["id"]
    deadline = time.monotonic() + TIMEOUT
    while httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = httpx.delete(f"{base}/v1/jobs/{job_id}", timeout=30).json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    time.sleep(0.3)  # the report in flight sees the cancel at its next progress report (0.1 s apart)
    with slow.lock:
        seen = slow.reports
    time.sleep(1.0)
    with slow.lock:
        assert slow.reports == seen, "the cancelled report kept computing"
    explained = httpx.post(f"{base}/v1/explain/gradcam", timeout=60,
                           files=[("image", ("a.png", _png(), "image/png"))])
    assert explained.status_code == 200  # the lanes serve on


def test_a_report_past_its_deadline_fails_with_deadline_exceeded(registry, methods):
    with running_server(Settings(default_model="tiny_cnn", sanity_deadline_s=0.5), registry) as (base, _):
        r = start(base, {"methods": [SlowGradient.name]})
        job = follow(base, r.json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded"
        assert "sanity_deadline_s" in job["error"]["message"]
        assert httpx.get(f"{base}/v1/models/tiny_cnn/sanity", timeout=30).status_code == 404
        assert httpx.get(f"{base}/v1/models", timeout=30).json()[0]["sanity"]["status"] == "failed"


@pytest.mark.parametrize("body, code, words", [
    ({"methods": ["no-such-method"]}, "invalid_sanity", "unknown method 'no-such-method'"),
    ({"methods": []}, "invalid", "methods"),
    ({"profile": "thorough"}, "invalid", "profile"),
    ({"seed": -1}, "invalid", "seed"),
    ({"seed": "7"}, "invalid", "seed"),
    ({"steps": 3}, "invalid", "steps"),
])
def test_bad_requests_get_a_422_naming_the_problem(server, body, code, words):
    base, _ = server
    r = start(base, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"]


def test_an_unknown_model_and_a_missing_report_are_404s(registry):
    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _):
        r = start(base, {}, model="no_such_model")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
        r = httpx.get(f"{base}/v1/models/no_such_model/sanity", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
        r = httpx.get(f"{base}/v1/models/tiny_cnn/sanity", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_sanity_report"
        assert "POST /v1/models/tiny_cnn/sanity" in r.json()["error"]["message"]
        assert httpx.get(f"{base}/v1/models", timeout=30).json()[0]["sanity"] is None


def test_the_routes_are_in_the_openapi_document(server):
    base, _ = server
    paths = httpx.get(f"{base}/openapi.json", timeout=30).json()["paths"]
    sanity = paths["/v1/models/{name}/sanity"]
    assert sanity["post"]["operationId"] == "start_sanity" and sanity["get"]["operationId"] == "get_sanity"
    assert {"202", "404", "422", "429"} <= set(sanity["post"]["responses"])
    methods = httpx.get(f"{base}/v1/methods", timeout=30).json()
    assert all(m["metrics_forwards_at_defaults"] == 77  # 4 (20 - 1) + 1
               for m in methods if "classification" in m["tasks"])


def _png() -> bytes:
    from tests.test_api import png_bytes, random_image

    return png_bytes(random_image(0))


# ------------------------------------------------------------------------------ the client and the CLI


def test_the_client_makes_and_reads_reports(registry, methods):
    from saliency_client import Client, ValidationError

    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _), Client(base) as client:
        assert client.sanity_report("tiny_cnn") is None
        report = client.sanity("tiny_cnn", methods=[EdgeDetector.name, "gradient"], seed=5)
        assert report.methods[EdgeDetector.name].verdict == "fail"
        assert report.methods["gradient"].verdict == "pass" and report.seed == 5
        assert client.sanity_report("tiny_cnn") == report
        listed = {m.name: m for m in client.models()}["tiny_cnn"]
        assert listed.sanity is not None and listed.sanity.methods["gradient"]["verdict"] == "pass"
        with pytest.raises(ValidationError) as refused:
            client.sanity("tiny_cnn", profile="thorough")
        assert refused.value.status_code == 422 and "profile" in str(refused.value)
        result = client.explain(_png(), "gradcam", outputs=["npy", "metrics"],
                                metrics={"steps": 5, "replacement": "black"})
        assert result[0].metrics["steps"] == 5 and result[0].metrics["replacement"] == "black"
        assert len(result[0].metrics["deletion_curve"]) == 6


def test_the_cli_prints_the_report_and_the_metrics_in_words(registry, methods, tmp_path, capsys):
    from saliency_client.cli import main

    with running_server(Settings(default_model="tiny_cnn"), registry) as (base, _):
        assert main(["--url", base, "sanity", "tiny_cnn", "--cached"]) == 1
        assert "no sanity report of tiny_cnn yet" in capsys.readouterr().err
        args = ["--url", base, "sanity", "tiny_cnn", "--methods", f"{EdgeDetector.name},gradient", "-q"]
        assert main(args) == 0
        out = capsys.readouterr().out
        rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
        assert rows == {EdgeDetector.name: "fail", "gradient": "pass"}
        assert "explains the image, not the model" in out
        assert main([*args, "--strict"]) == 2  # a failing method, kept report: answered at once
        assert main(["--url", base, "sanity", "tiny_cnn", "--cached", "--json"]) == 0
        assert '"weights_sha256"' in capsys.readouterr().out

        photo = tmp_path / "a.png"
        photo.write_bytes(_png())
        assert main(["--url", base, "explain", str(photo), "--metrics", "--metrics-steps", "4"]) == 0
        out = capsys.readouterr().out
        assert "deletion AUC" in out and "(random order" in out and "4 steps, blur" in out
        assert main(["--url", base, "explain", str(photo), "--metrics", "--json"]) == 0
        import json

        line = json.loads(capsys.readouterr().out)
        assert line["metrics"]["steps"] == 20 and "deletion_auc_random" in line["metrics"]
