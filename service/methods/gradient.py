"""Plain gradient saliency (Simonyan et al., 2014): d logit_c / d x."""
from __future__ import annotations

from .base import Attribution, HeatmapParams, SinglePassMethod
from .gradients import input_gradients
from .postprocess import heatmap


class GradientParams(HeatmapParams):
    pass


class Gradient(SinglePassMethod):
    name = "gradient"
    title = "Gradient (Simonyan et al. 2014)"
    Params = GradientParams

    def attribute_chunk(self, model, x, targets, params):
        grads, _ = input_gradients(model.module, x, targets)
        return Attribution(grads, heatmap(grads, params.aggregation, params.normalization),
                           [{} for _ in range(x.shape[0])])
