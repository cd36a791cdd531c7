"""The real default model (EfficientNet-Lite0, ImageNet) on a real photo, through the engine."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

from service.engine import explain
from service.methods import METHODS

QUICK = {"integrated-gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4},
         "moreaugrad": {"iterations": 3, "n_samples": 2}}


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules())


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # touching torch.distributed's deprecated aliases while scanning objects
        warnings.simplefilter("ignore")
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


# every method but the one made for transformers, which refuses a CNN (tests/test_attention_relevance.py)
@pytest.mark.parametrize("name", sorted(set(METHODS) - {"attention-relevance"}))
def test_every_method_explains_chelsea(default_model, chelsea_batch, name):
    [result] = explain(default_model, METHODS[name], chelsea_batch, [None],
                       METHODS[name].Params(**QUICK.get(name, {})))
    assert result.label == "Egyptian cat" and result.probability > 0.7
    assert [c.label for c in result.top_k][:1] == ["Egyptian cat"] and len(result.top_k) == 5
    heat = result.heatmap
    assert heat.shape == (224, 224) and torch.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1 and heat.std() > 0.05
    assert hook_count(default_model.module) == 0


def test_explicit_target_and_range_check(default_model, chelsea_batch):
    [result] = explain(default_model, METHODS["gradcam"], chelsea_batch, [967], METHODS["gradcam"].Params())
    assert result.target == 967 and result.label == "espresso" and result.probability < 0.01
    with pytest.raises(ValueError, match="target 1000 for image 0 is out of range"):
        explain(default_model, METHODS["gradcam"], chelsea_batch, [1000], METHODS["gradcam"].Params())


def test_cat_is_where_gradcam_looks(default_model, chelsea_batch):
    """chelsea: the cat fills the middle-left; the map's mass must not sit on the border."""
    [result] = explain(default_model, METHODS["gradcam"], chelsea_batch, [None], METHODS["gradcam"].Params())
    heat = result.heatmap
    centre = heat[40:184, 40:184].mean()
    border = torch.cat([heat[:20].flatten(), heat[-20:].flatten()]).mean()
    assert centre > border


def test_hooks_released_and_no_leak_over_50_calls(default_model, chelsea_batch):
    params = METHODS["gradcam"].Params()
    explain(default_model, METHODS["gradcam"], chelsea_batch, [None], params)
    tensors_before = live_tensors()
    for i in range(50):
        explain(default_model, METHODS["gradcam"], chelsea_batch, [None], params)
        if i % 5 == 0:  # FullGrad hooks every bias layer: fewer calls cover it
            explain(default_model, METHODS["fullgrad"], chelsea_batch, [None], METHODS["fullgrad"].Params())
    tensors_after = live_tensors()
    assert hook_count(default_model.module) == 0
    assert tensors_after - tensors_before < 10


def test_hooks_released_when_the_method_fails(default_model, chelsea_batch):
    with pytest.raises(ValueError):
        METHODS["gradcam"].attribute(default_model.explainee(), chelsea_batch, torch.tensor([0]),
                                     METHODS["gradcam"].Params(layer="global_pool.flatten"))
    assert hook_count(default_model.module) == 0
