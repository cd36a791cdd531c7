"""Integrated Gradients (Sundararajan et al., 2017), computed by Captum's IntegratedGradients.

The black, zeros and blur baselines are deterministic. The uniform baseline is noise drawn from `seed`, so the
map depends on that draw: with the per-map metrics (`outputs=metrics`) its `stability` is the Spearman rank
correlation of the served map and the map of the same call with another uniform baseline, drawn from the seed
`redraw_seed(seed)` = seed XOR 0x5EED5EED (an independent generator; the pairing is symmetric: seeds s and
redraw_seed(s) measure each other), at the same n_steps and quadrature. That costs n_steps more passes per
image, counted in the call's cost (`Method.redraw`)."""
from __future__ import annotations

import math
from typing import Literal

import torch
from captum.attr import IntegratedGradients as CaptumIG
from pydantic import Field, model_validator
from torchvision.transforms.functional import gaussian_blur

from .base import Attribution, HeatmapParams, Method, checkpoint
from .noise import generators
from .passes import class_scores, clean_logits, resolve_targets
from .postprocess import heatmap


class IntegratedGradientsParams(HeatmapParams):
    n_steps: int = Field(50, ge=1, le=1024, description="points on the path from the baseline to the image")
    method: Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                    "riemann_trapezoid"] = Field(
        "gausslegendre", description="quadrature rule (Captum's names)")
    baseline: Literal["black", "zeros", "blur", "uniform"] = Field(
        "black", description="black image in pixel space (the paper's), zeros in model-input space, "
                             "a blurred copy of the image, or uniform noise in pixel space")
    blur_sigma: float = Field(10.0, ge=0.1, le=100,
                              description="Gaussian blur std in pixels, for baseline=blur")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the uniform-noise baseline")

    @model_validator(mode="after")
    def _riemann_needs_two_points(self):
        if self.method.startswith("riemann") and self.n_steps < 2:
            raise ValueError(f"n_steps must be at least 2 for {self.method} (1 is allowed for "
                             "gausslegendre only)")
        return self


# XORed into the call's seed for the uniform baseline's second, independent draw: in range (both < 2**31),
# never the seed itself, and its own inverse.
REDRAW_SEED_MASK = 0x5EED5EED


def redraw_seed(seed: int) -> int:
    """The seed of the second uniform baseline, whose map the served one's `stability` is measured against."""
    return seed ^ REDRAW_SEED_MASK


def make_baseline(model, x: torch.Tensor, params: IntegratedGradientsParams) -> torch.Tensor:
    if params.baseline == "zeros":
        return torch.zeros_like(x)
    if params.baseline == "black":
        return model.normalize(torch.zeros_like(x))
    if params.baseline == "blur":
        # Blurring commutes with the per-channel affine normalisation, so blur in model-input space.
        kernel = min(2 * math.ceil(3 * params.blur_sigma) + 1, 2 * (min(x.shape[-2:]) // 2) - 1)
        return gaussian_blur(x, [kernel, kernel], [params.blur_sigma, params.blur_sigma])
    gens = generators(params.seed, x.shape[0], x.device)
    noise = torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in gens])
    return model.normalize(noise)


class IntegratedGradients(Method):
    name = "integrated-gradients"
    title = "Integrated Gradients (Sundararajan et al. 2017)"
    Params = IntegratedGradientsParams
    cost_factors = ("n_steps",)
    fp32_forward = True
    diagnostics = {"convergence_delta": "sum of the attribution minus F(image) - F(baseline): completeness, "
                                        "0 for an exact integral",
                   "relative_delta": "|convergence_delta| / |score_difference|",
                   "score_difference": "F(image) - F(baseline) for the explained class"}

    def redraw(self, params):
        """Only the uniform baseline is drawn: the same call from the seed `redraw_seed(seed)`."""
        if params.baseline != "uniform":
            return None
        return params.model_copy(update={"seed": redraw_seed(params.seed)})

    def attribute(self, model, x, targets, params, progress=None):
        x = x.detach()
        baseline = make_baseline(model, x, params)
        # One forward of [images; baselines] gives the prediction, the top-1 targets and both ends of the
        # convergence delta (Captum would run its own two forwards for the delta).
        before_pass = checkpoint(progress)
        ends = clean_logits(model.module, torch.cat([x, baseline]), model.max_batch, before_pass)
        logits, baseline_logits = ends[: x.shape[0]], ends[x.shape[0]:]
        targets = resolve_targets(logits, targets)

        def forward(inputs: torch.Tensor) -> torch.Tensor:  # Captum's passes, each after a checkpoint
            before_pass()
            return model.module(inputs)

        ig = CaptumIG(forward, multiply_by_inputs=True)
        with torch.enable_grad():
            attribution = ig.attribute(x, baselines=baseline, target=targets, n_steps=params.n_steps,
                                       method=params.method,
                                       internal_batch_size=max(model.max_batch, x.shape[0]))
        if progress:
            progress(1, 1)
        gap = (class_scores(logits, targets) - class_scores(baseline_logits, targets)).to(x.dtype)
        delta = attribution.detach().flatten(1).sum(1) - gap  # completeness: sum(IG) = F(x) - F(baseline)
        diagnostics = [{"convergence_delta": float(d), "relative_delta": float(abs(d) / max(abs(g), 1e-12)),
                        "score_difference": float(g)}
                       for d, g in zip(delta.tolist(), gap.tolist(), strict=True)]
        return Attribution(attribution.detach(), heatmap(attribution.detach(), params.aggregation,
                                                         params.normalization), diagnostics, logits, targets)
