"""SmoothGrad (Smilkov et al., 2017): gradients averaged over noisy copies of the image.

Not Captum's NoiseTunnel: its `stdevs` is one absolute std per input tensor, while SmoothGrad's noise is a
fraction of each image's own value range, and batch invariance needs noise seeded per image.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Attribution, HeatmapParams, Method, SeededParams, checkpoint
from .noise import generators, normal_like, value_range
from .passes import clean_logits, input_gradients, resolve_targets
from .postprocess import heatmap


class SmoothGradParams(HeatmapParams, SeededParams):
    n_samples: int = Field(25, ge=1, le=1024, description="noisy copies per image")
    noise_level: float = Field(0.15, ge=0, le=1,
                               description="noise std as a fraction of the image's (max - min)")
    variant: Literal["smoothgrad", "smoothgrad_sq", "vargrad"] = Field(
        "smoothgrad", description="mean of gradients, mean of squared gradients, or their variance")


class SmoothGrad(Method):
    name = "smoothgrad"
    title = "SmoothGrad (Smilkov et al. 2017)"
    Params = SmoothGradParams
    cost_factors = ("n_samples",)
    fp32_forward = True
    diagnostics = {"noise_std": "the noise's standard deviation, in model-input units"}

    def attribute(self, model, x, targets, params, progress=None):
        n = params.n_samples
        before_pass = checkpoint(progress)
        logits = clean_logits(model.module, x, model.max_batch, before_pass)
        targets = resolve_targets(logits, targets)
        sigma = params.noise_level * value_range(x)  # (B,1,1,1)
        noise = normal_like(x, n, generators(params.seed, x.shape[0], x.device))  # (B,n,C,H,W)
        noisy = (x.unsqueeze(1) + sigma.unsqueeze(1) * noise).flatten(0, 1)
        grads, _ = input_gradients(model.module, noisy, targets.repeat_interleave(n), model.max_batch,
                                   before_pass)
        grads = grads.view(x.shape[0], n, *x.shape[1:])
        if progress:
            progress(1, 1)
        attribution = combine(grads, params.variant)
        halves = None
        if n >= 2:  # the same estimate from each half of the samples: how much the map owes to the noise
            halves = (heatmap(combine(grads[:, : n // 2], params.variant), params.aggregation, "minmax"),
                      heatmap(combine(grads[:, n // 2:], params.variant), params.aggregation, "minmax"))
        diagnostics = [{"noise_std": float(s)} for s in sigma.flatten().tolist()]
        return Attribution(attribution, heatmap(attribution, params.aggregation, params.normalization),
                           diagnostics, logits, targets, halves)


def combine(grads, variant: str):
    """(B, n, C, H, W) noisy gradients -> (B, C, H, W): their mean, mean square or variance."""
    mean = grads.mean(1)
    if variant == "smoothgrad":
        return mean
    square = (grads ** 2).mean(1)
    return square - mean ** 2 if variant == "vargrad" else square
