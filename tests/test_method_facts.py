"""Each method's facts, declared on its class, are what the service budgeted and published before they moved
there (the cost texts of GET /v1/methods, the passes admission counts, progress steps, the queue's batch
budget, the precision policy)."""
from __future__ import annotations

import pytest

from service.methods import METHODS

# What service/api/catalog.py and service/engine.py spelled out by name before the facts moved to the classes.
COST_TEXT = {"gradcam": "1 pass", "gradient": "1 pass", "fullgrad": "1 pass",
             "integrated-gradients": "n_steps passes", "smoothgrad": "n_samples passes",
             "moreaugrad": "iterations x n_samples passes"}
FP32_FORWARD = {"gradient", "integrated-gradients", "smoothgrad", "moreaugrad"}


@pytest.mark.parametrize("name", sorted(COST_TEXT))
def test_cost_text_and_precision_policy_are_unchanged(name):
    method = METHODS[name]
    assert method.cost_text() == COST_TEXT[name]
    assert method.fp32_forward is (name in FP32_FORWARD)
    assert method.iterative is (name == "moreaugrad")


def test_passes_steps_and_batch_budget():
    ig, sg, mg = METHODS["integrated-gradients"], METHODS["smoothgrad"], METHODS["moreaugrad"]
    assert ig.cost(ig.Params(n_steps=7)) == ig.batch_cost(ig.Params(n_steps=7)) == 7
    assert ig.steps(ig.Params(n_steps=7)) == 1
    assert sg.cost(sg.Params(n_samples=9)) == sg.batch_cost(sg.Params(n_samples=9)) == 9
    params = mg.Params(iterations=40, n_samples=3)
    assert (mg.cost(params), mg.steps(params), mg.batch_cost(params)) == (120, 40, 3)
    for name in ("gradcam", "gradient", "fullgrad"):
        method = METHODS[name]
        assert (method.cost(method.Params()), method.steps(method.Params()),
                method.batch_cost(method.Params())) == (1, 1, 1)
