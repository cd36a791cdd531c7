"""The stability of Integrated Gradients' map with a uniform baseline (issue 25, item 1): the baseline is
drawn from `seed`, so with the per-map metrics the engine runs the same call again with a second uniform
baseline (drawn from seed XOR 0x5EED5EED, the method's `redraw`) and reports the Spearman rank correlation of
the two maps. Oracles: the same figure from Captum and service/evidence/ranks.py directly, the passes actually
run against the cost counted, and two planted linear models, one whose ranks no baseline can move (1) and one
whose map is the baseline's alone (the two draws' own correlation, near 0)."""
from __future__ import annotations

import base64
import dataclasses
import time

import httpx
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from torch import nn

from service.engine import explain
from service.errors import Cancelled
from service.evidence.curves import forwards_per_image
from service.evidence.ranks import spearman
from service.evidence.spec import MetricsParams
from service.methods import METHODS
from service.methods.postprocess import heatmap
from service.pipeline import passes_per_image
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server
from tests.test_api import png_bytes, random_image

IG = METHODS["integrated-gradients"]
SECOND_SEED = 0x5EED5EED  # XORed into the call's seed: the documented derivation, written out here
METRICS = MetricsParams(steps=4, replacement="black")


@pytest.fixture(scope="module")
def tiny():
    return ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"}).models["tiny_cnn"]


def pixels(tiny, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return tiny.preprocess.normalize(torch.rand(batch, 3, *tiny.input_size, generator=g))


def uniform_baseline(tiny, seed: int) -> torch.Tensor:
    """(1, 3, H, W): the uniform baseline an image gets from `seed` (a CPU generator), in model space."""
    g = torch.Generator().manual_seed(seed)
    return tiny.preprocess.normalize(torch.rand(3, *tiny.input_size, generator=g))[None]


class Rows:
    """Counts the images every forward pass of a module takes (method passes and metrics forwards alike)."""

    def __init__(self, module: nn.Module):
        self.count = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.count += inputs[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def rows_run(model, params, metrics: MetricsParams | None, batch: int = 2, progress=None) -> int:
    with Rows(model.module) as rows:
        explain(model, IG, pixels(model, batch), [None] * batch, params, metrics=metrics, progress=progress)
    return rows.count


# ---- (1) the figure is the rank correlation of the served map and a second, independent draw -------------

def test_uniform_baseline_stability_is_the_spearman_of_the_served_and_the_redrawn_map(tiny):
    params = IG.Params(n_steps=8, baseline="uniform", seed=3)
    x = pixels(tiny)
    served = explain(tiny, IG, x, [None, 4], params, metrics=METRICS)
    for b, res in enumerate(served):
        stability = res.metrics["stability"]
        assert isinstance(stability, float) and -1.0 <= stability <= 1.0
        # Captum's IG of the same image and class from the baseline of seed 3 ^ 0x5EED5EED, post-processed as
        # the call asks (abs_sum, percentile): the map the served one is compared with.
        target = torch.tensor([res.target])
        ig = CaptumIG(tiny.module, multiply_by_inputs=True)
        again = ig.attribute(x[b:b + 1], baselines=uniform_baseline(tiny, 3 ^ SECOND_SEED), target=target,
                             n_steps=8, method="gausslegendre")
        expected = spearman(res.heatmap, heatmap(again, "abs_sum", "percentile")[0])
        assert stability == pytest.approx(expected, abs=1e-4)
        # ...and the served map is still the one of the call's own seed
        own = ig.attribute(x[b:b + 1], baselines=uniform_baseline(tiny, 3), target=target, n_steps=8,
                           method="gausslegendre")
        torch.testing.assert_close(res.heatmap, heatmap(own, "abs_sum", "percentile")[0], atol=1e-5, rtol=0)
        assert stability < 0.9999  # two different baselines: the tiny CNN's maps differ


def test_the_second_seed_is_an_independent_draw_and_pairs_both_ways():
    params = IG.Params(baseline="uniform", seed=7)
    second = IG.redraw(params)
    assert second.seed == 7 ^ SECOND_SEED and 0 <= second.seed <= 2**31 - 1 and second.seed != 7
    assert IG.redraw(second).seed == 7  # seeds s and s ^ mask measure each other
    assert second.model_dump() == {**params.model_dump(), "seed": 7 ^ SECOND_SEED}  # nothing else changes
    IG.Params.model_validate(second.model_dump())  # a valid request of its own
    assert IG.redraw(IG.Params(baseline="uniform", seed=2**31 - 1)).seed <= 2**31 - 1


# ---- (2) deterministic baselines: no figure, no extra cost -------------------------------------------------

@pytest.mark.parametrize("baseline", ["black", "zeros", "blur"])
def test_a_deterministic_baseline_has_no_stability_and_costs_nothing_more(tiny, baseline):
    params = IG.Params(n_steps=6, baseline=baseline)
    assert IG.redraw(params) is None
    assert passes_per_image(IG, params, METRICS) == 6 + METRICS.forwards
    [res] = explain(tiny, IG, pixels(tiny, 1), [None], params, metrics=METRICS)
    assert res.metrics["stability"] is None
    # the passes run: the method's (its clean ends, 2 forwards, and n_steps) and the metrics', nothing else
    assert rows_run(tiny, params, METRICS) == rows_run(tiny, params, None) + 2 * METRICS.forwards


def test_the_other_methods_are_unchanged():
    for name, method in METHODS.items():
        if name != "integrated-gradients":
            assert method.redraw(method.Params()) is None, name
            assert passes_per_image(method, method.Params(), METRICS) == (method.cost(method.Params())
                                                                          + METRICS.forwards)


# ---- (3) the cost counts exactly n_steps more, only with a uniform baseline and metrics --------------------

@pytest.mark.parametrize("n_steps", [1, 8, 50])
def test_passes_per_image_grows_by_n_steps_for_a_uniform_baseline_with_metrics(n_steps):
    uniform, black = IG.Params(n_steps=n_steps, baseline="uniform"), IG.Params(n_steps=n_steps)
    assert passes_per_image(IG, uniform, None) == passes_per_image(IG, black, None) == n_steps
    assert passes_per_image(IG, uniform, METRICS) - passes_per_image(IG, black, METRICS) == n_steps
    assert passes_per_image(IG, uniform, METRICS) == 2 * n_steps + forwards_per_image(METRICS.steps)


def test_the_passes_run_are_the_passes_counted(tiny):
    """Per image, the second draw runs n_steps passes more (as counted) and its 2 clean-end forwards (image
    and baseline: uncounted, as for the served draw)."""
    uniform, black = IG.Params(n_steps=5, baseline="uniform"), IG.Params(n_steps=5)
    assert rows_run(tiny, uniform, METRICS) - rows_run(tiny, black, METRICS) == 2 * (5 + 2)
    assert rows_run(tiny, uniform, None) == rows_run(tiny, black, None)  # no metrics: no second draw


def test_the_second_draw_reports_progress_and_is_cancelled_within_a_pass(tiny):
    params = IG.Params(n_steps=5, baseline="uniform")
    reports: list[tuple[int, int]] = []
    rows_run(tiny, params, METRICS, progress=lambda done, total: reports.append((done, total)))
    assert {total for _, total in reports} == {2}  # the served draw's step, then the second's
    assert [done for done, _ in reports] == sorted(done for done, _ in reports) and reports[-1] == (2, 2)
    assert (1, 2) in reports and (0, 2) in reports

    seen = []

    def cancel_in_the_second_draw(done: int, total: int) -> None:
        seen.append(done)
        if seen.count(1) == 2:  # the second draw's first checkpoint (the first (1, 2) ends the served draw)
            raise Cancelled()

    with pytest.raises(Cancelled), Rows(tiny.module) as rows:
        explain(tiny, IG, pixels(tiny), [None, None], params, metrics=METRICS,
                progress=cancel_in_the_second_draw)
    assert rows.count == rows_run(tiny, params, None)  # the served draw's passes only


# ---- (4) planted: it measures how much the map owes to the baseline ---------------------------------------

def linear(tiny, weight: torch.Tensor):
    """`tiny` with its network replaced by a linear model in model-input space: class 0's score is
    sum(weight * x), the other classes' 0. Its IG is weight * (x - baseline) exactly."""
    net = nn.Linear(weight.numel(), tiny.num_classes, bias=False)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0] = weight.flatten()
    module = nn.Sequential(nn.Flatten(), net).eval().requires_grad_(False)
    return dataclasses.replace(tiny, module=module)


def test_a_map_whose_ranks_no_baseline_can_move_is_stable(tiny):
    """Weights on channel 0 only, spaced by a factor 1.005, and x = 1000 everywhere: the map w * |1000 - b|
    with a baseline b in [-2, 2] (pixel noise, normalised) moves each pixel by at most 0.4 %, less than the
    gap to its neighbour in rank, so any two baselines give the same ranks: stability 1."""
    h, w = tiny.input_size
    order = torch.randperm(h * w, generator=torch.Generator().manual_seed(1))
    weight = torch.zeros(3, h, w)
    weight[0] = (1.005 ** order.double()).float().view(h, w)
    model = linear(tiny, weight)
    x = torch.full((1, 3, h, w), 1000.0)
    [res] = explain(model, IG, x, [0], IG.Params(n_steps=4, baseline="uniform", seed=5), metrics=METRICS)
    assert res.metrics["stability"] == pytest.approx(1.0, abs=1e-9)


def test_a_map_set_by_the_baseline_alone_has_the_draws_own_correlation(tiny):
    """Equal weights and x = 0 in model space (pixel 0.5): the map is sum_c |b_c|, the baseline's alone, so
    the figure is the rank correlation of the two draws' maps, computed here from the generators, and near 0
    for independent draws (its standard deviation at 64 x 64 pixels is about 1/64)."""
    h, w = tiny.input_size
    model = linear(tiny, torch.ones(3, h, w))
    x = torch.zeros(1, 3, h, w)
    params = IG.Params(n_steps=4, baseline="uniform", seed=11, normalization="minmax")
    [res] = explain(model, IG, x, [0], params, metrics=METRICS)
    first, second = (uniform_baseline(tiny, s)[0].abs().sum(0) for s in (11, 11 ^ SECOND_SEED))
    stability = res.metrics["stability"]
    assert stability == pytest.approx(spearman(first, second), abs=1e-4)
    assert abs(stability) < 0.1
    # the served map is the first draw's, in rank
    assert spearman(res.heatmap, first) == pytest.approx(1.0, abs=1e-6)


# ---- through the API: admission counts the second draw, a job's progress includes it ----------------------

@pytest.fixture(scope="module")
def server():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    # at n_steps=8 and metrics_steps=4: a black baseline costs 8 + 13 = 21 passes, a uniform one 29
    with running_server(Settings(default_model="tiny_cnn", cache_bytes=0, max_request_cost=25),
                        registry) as (base, app):
        yield base, app


def job_done(base: str, r: httpx.Response, timeout: float = 60) -> dict:
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{base}/v1/jobs/{r.json()['id']}", timeout=30).json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def test_through_the_api(server):
    base, _ = server
    blob = base64.b64encode(png_bytes(random_image(3))).decode()

    def job(baseline: str, n_steps: int) -> httpx.Response:
        return httpx.post(f"{base}/v1/jobs", timeout=30, json={
            "method": "integrated-gradients", "images": [blob], "outputs": ["metrics"],
            "params": {"n_steps": n_steps, "baseline": baseline}, "metrics": {"steps": 4}})

    black = job_done(base, job("black", 8))
    assert black["status"] == "succeeded", black
    assert black["result"]["results"][0]["metrics"]["stability"] is None
    assert black["progress"] == {"done": 1, "total": 1}
    refused = job("uniform", 8)  # 29 passes: over the limit only with the second draw counted
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "too_costly", refused.text
    uniform = job_done(base, job("uniform", 4))
    assert uniform["status"] == "succeeded", uniform
    assert -1.0 <= uniform["result"]["results"][0]["metrics"]["stability"] <= 1.0
    assert uniform["progress"] == {"done": 2, "total": 2}  # the second draw's step counted
