"""Ray Serve: replicas share the load, a killed replica loses no request, the shared state's rules.

The API contract itself runs on Ray through tests/test_api.py's `server` fixture (parametrised by engine).
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service.distributed.state import SharedState
from tests.test_api import direct, npy, png_bytes, random_image

DEPLOYMENT = "explainer_tiny_cnn"


def replica_images(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    pattern = rf'saliency_replica_images_total\{{deployment="{DEPLOYMENT}",replica="([^"]+)"\}} ([0-9.e+]+)'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}


def explain(base: str, i: int, method: str = "smoothgrad", params: dict | None = None) -> httpx.Response:
    params = {"n_samples": 8} if params is None else params
    return httpx.post(f"{base}/v1/explain/{method}", timeout=120,
                      data={"model": "tiny_cnn", "target": str(i % 10), "size": "input",
                            **{k: str(v) for k, v in params.items()}},
                      files=[("image", (f"{i}.png", png_bytes(random_image(100 + i)), "image/png"))])


def explain_retrying(base: str, i: int, method: str, params: dict,
                     attempts: int = 10) -> tuple[httpx.Response, int]:
    """A client following the documented semantics: 503 and 429 (and a dropped connection) were not
    computed; retry after Retry-After."""
    for attempt in range(attempts):
        try:
            r = explain(base, i, method, params)
        except httpx.TransportError:
            time.sleep(1)
            continue
        if r.status_code not in (429, 503):
            return r, attempt
        time.sleep(min(float(r.headers.get("retry-after", 1)), 5))
    raise AssertionError(f"request {i} still refused after {attempts} attempts")


def check_own(registry, r: httpx.Response, i: int, method: str, params: dict) -> None:
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["target"] == i % 10
    np.testing.assert_allclose(npy(res["map"]["npy"]),
                               direct(registry, random_image(100 + i), method, i % 10, params), atol=1e-5)


@pytest.mark.ray
def test_two_replicas_both_receive_work_and_each_answer_is_its_own(ray_server, registry):
    base, _ = ray_server
    before = replica_images(base)
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: explain(base, i), range(48)))
    for i, r in enumerate(responses):
        check_own(registry, r, i, "smoothgrad", {"n_samples": 8})
    after = replica_images(base)
    served = {replica: after[replica] - before.get(replica, 0) for replica in after}
    assert sum(served.values()) == 48
    assert len([n for n in served.values() if n > 0]) == 2, f"both replicas should get work: {served}"


def replica_actors() -> dict[str, str]:
    """Replica id -> actor name, for the live tiny_cnn explainer replicas."""
    import ray

    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if f"#{DEPLOYMENT}#" in name:
            out[name.rsplit("#", 1)[1]] = name
    return out


def lost_replicas(base: str) -> float:
    m = re.search(r"^saliency_replica_lost_total ([0-9.e+]+)$", httpx.get(f"{base}/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.ray
def test_killing_a_replica_mid_load_loses_no_request_and_serve_restarts_it(ray_server, registry):
    import ray

    base, _ = ray_server
    before = replica_actors()
    assert len(before) == 2
    victim_id, victim_name = sorted(before.items())[0]
    lost_before = lost_replicas(base)
    method, params = "integrated-gradients", {"n_steps": 48}
    done: list[int] = []

    def one(i: int):
        r, retries = explain_retrying(base, i, method, params)
        done.append(i)
        return r

    killer_ran = threading.Event()

    def killer():
        while len(done) < 8:  # mid-load: some answered, many in flight or queued on both replicas
            time.sleep(0.01)
        ray.kill(ray.get_actor(victim_name, namespace="serve"), no_restart=True)
        killer_ran.set()

    threading.Thread(target=killer, daemon=True).start()
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(60)))
    assert killer_ran.is_set()
    for i, r in enumerate(responses):
        check_own(registry, r, i, method, params)  # every request answered, each with its own image's map
    assert lost_replicas(base) > lost_before, "the kill should have hit requests in flight (then retried)"

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = replica_actors()
        if len(now) == 2 and victim_id not in now:
            break
        time.sleep(0.5)
    assert len(now) == 2 and victim_id not in now, f"Serve should restart the replica: {now}"
    assert httpx.get(f"{base}/readyz").status_code == 200
    with ThreadPoolExecutor(8) as pool:  # the new replica serves too
        for i, r in enumerate(pool.map(lambda i: explain(base, i), range(8))):
            check_own(registry, r, i, "smoothgrad", {"n_samples": 8})


# ---------------------------------------------------------------------- the state's rules, without Ray
def view(job_id: str, status: str = "queued") -> dict:
    return {"id": job_id, "method": "gradient", "model": "tiny_cnn", "status": status,
            "progress": {"done": 0, "total": 2}, "created": 0.0, "result": None, "error": None}


def test_state_jobs_progress_cancel_finish_and_bounds():
    async def run():
        state = SharedState(max_jobs=2, ttl_s=3600)
        assert await state.add(view("a"), [1, 1]) is None
        assert await state.progress([("a", 0, 1, 1), ("sync-call", 0, 1, 1)]) == [False, False]
        assert (await state.view("a"))["status"] == "running"
        assert (await state.view("a"))["progress"] == {"done": 1, "total": 2}
        assert (await state.cancel("a"))["id"] == "a"
        assert await state.progress([("a", 1, 1, 1)]) == [True]  # explainers learn it at their next report
        await state.finish(view("b", "succeeded"), [3], time.time())  # an outcome may arrive before its add
        assert (await state.view("b"))["progress"] == {"done": 3, "total": 3}
        assert await state.counts() == {"running": 1, "succeeded": 1}
        assert await state.add(view("c"), [1]) is None  # full: the finished job makes room
        assert await state.view("b") is None
        assert await state.add(view("d"), [1]) is not None  # two unfinished jobs held: refused
        assert await state.view("zzz") is None

    asyncio.run(run())


def test_state_forgets_the_oldest_finished_results_past_its_byte_budget():
    def finished(job_id: str) -> dict:
        return {**view(job_id, "succeeded"), "result": {"results": [{"map": {"npy": "A" * 100}}]}}

    async def run():
        state = SharedState(max_jobs=100, ttl_s=3600, max_result_bytes=250)
        for i, job_id in enumerate(("old", "middle", "new")):
            await state.finish(finished(job_id), [1], time.time() - 30 + i)
        assert await state.add(view("running"), [1]) is None  # evicts: 300 bytes held, the oldest goes
        assert await state.view("old") is None
        assert [(await state.view(j))["status"] for j in ("middle", "new", "running")] == \
            ["succeeded", "succeeded", "queued"]

    asyncio.run(run())


def test_serve_config_file_validates_and_names_the_apps_deployments():
    """deploy/ray-serve.yaml is a valid Serve config whose deployments are the ones the builder makes."""
    pytest.importorskip("ray.serve", reason="ray is not installed: pip install '.[ray]'")
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from service.distributed.app import app_builder, explainer_name, servable_models
    from service.settings import Settings
    from tests.conftest import ROOT

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text()))
    [app] = config.applications
    assert app.import_path == "service.distributed.app:app_builder" and app.route_prefix == "/"
    args = dict(app.args)
    assert isinstance(app_builder(dict(args)), Application)
    args.pop("threads")
    made = {"ingress", "state"} | {explainer_name(m) for m in servable_models(Settings(**args))}
    assert {d.name for d in app.deployments} == made


def test_explainers_ask_ray_for_a_gpu_only_when_the_cluster_has_one_and_the_device_may_use_it():
    pytest.importorskip("ray.serve", reason="ray is not installed: pip install '.[ray]'")
    from service.distributed.app import explainer_gpus
    from service.settings import Settings

    gpu = {"*": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}}
    assert explainer_gpus(Settings(), {"CPU": 16.0, "GPU": 1.0}) == gpu  # device=auto
    assert explainer_gpus(Settings(device="cuda:0"), {"GPU": 8.0}) == gpu
    assert explainer_gpus(Settings(device="cpu"), {"GPU": 1.0}) == {}
    assert explainer_gpus(Settings(), {"CPU": 2.0}) == {}  # this project's CPU machines
