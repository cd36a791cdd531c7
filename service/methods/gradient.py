"""Plain gradient saliency (Simonyan et al., 2014): d logit_c / d x."""
from __future__ import annotations

import torch

from .base import Attribution, HeatmapParams, SinglePassMethod
from .passes import class_scores, resolve_targets
from .postprocess import heatmap


class GradientParams(HeatmapParams):
    pass


class Gradient(SinglePassMethod):
    name = "gradient"
    title = "Gradient (Simonyan et al. 2014)"
    Params = GradientParams
    fp32_forward = True

    def attribute_chunk(self, model, x, targets, params):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = model.module(xg)
            targets = resolve_targets(logits, targets)
            (grads,) = torch.autograd.grad(class_scores(logits, targets).sum(), xg)
        return Attribution(grads, heatmap(grads, params.aggregation, params.normalization),
                           [{} for _ in range(x.shape[0])], logits.detach(), targets)
