"""MoreauGrad (Zhang & Farnia, ICCV 2023): the gradient of the Moreau envelope of the smoothed class score.

For each image: minimise over delta  E_z[f(x + z + delta)] + ||delta||^2 / (2 rho)  (+ eta * sparsity) by
(proximal) gradient steps with fresh Gaussian noise every iteration, as the official code does for one
image; the answer is -mean(delta over the last 101 iterates, or all of them when there are fewer) / rho: the
official code averages the iterates with MAX_ITR - (n_itr + 1) <= 100, i.e. 101 of them. Here the images of a
batch and all their noise samples share one pass per iteration; each image keeps its own delta, noise scale,
penalty and noise generator, so a batch returns exactly what one-at-a-time runs return.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..errors import InvalidInput
from .base import Attribution, HeatmapParams, Method, SeededParams, ServedModel, checkpoint
from .noise import generators, normal_like, value_range
from .passes import clean_logits, input_gradients, resolve_targets
from .postprocess import heatmap

AVERAGED_ITERATES = 101  # the official code's window: MAX_ITR - (n_itr + 1) in 0..100
DEFAULT_ETA = {"none": 0.0, "l1": 5e-3, "group": 5e-2}
# Under fp16, the exception to the float32 forward of input-gradient methods: MoreauGrad's map averages
# iterations x n_samples noisy gradients, and the activation flips of a whole-pass fp16 forward average out
# with them (bf16, three mantissa bits shorter, does not). At least this many draws per image run whole-pass
# autocast, so the forward uses the fast half-precision kernels too (docs/benchmarks.md,
# "MoreauGrad 200 x 32 on ResNet-50 at batch 8").
WHOLE_PASS_FP16_MIN_DRAWS = 64


class MoreauGradParams(HeatmapParams, SeededParams):
    rho: float = Field(1.0, gt=0, le=1e3,
                       description="Moreau envelope parameter (penalty ||delta||^2 / 2rho)")
    noise_level: float = Field(0.1, ge=0, le=1,
                               description="noise std as a fraction of the image's (max - min)")
    lr: float = Field(0.1, gt=0, le=10, description="gradient step size")
    iterations: int = Field(200, ge=1, le=2000, description="gradient steps")
    n_samples: int = Field(32, ge=1, le=256, description="noise draws per step")
    sparsity: Literal["none", "l1", "group"] = Field(
        "none", description="sparse (soft threshold) or group-sparse (block shrinkage) variant")
    eta: float | None = Field(None, ge=0, le=10,
                              description="sparsity weight (default 5e-3 l1, 5e-2 group)")
    group_size: int = Field(14, ge=1, le=64,
                            description="block side g of the 3 x g x g groups (sparsity=group)")

    @model_validator(mode="after")
    def _fill_eta(self):
        if self.lr >= 2 * self.rho:
            # each step scales delta by (1 - lr / rho) before the score's gradient: past 2 it grows without
            # bound
            raise ValueError(f"lr must be below 2 * rho (lr {self.lr:g}, rho {self.rho:g}): each step "
                             f"multiplies delta by 1 - lr/rho = {1 - self.lr / self.rho:g}, and the "
                             "iteration diverges")
        if self.eta is None:
            object.__setattr__(self, "eta", DEFAULT_ETA[self.sparsity])
        return self


def check_groups(params: MoreauGradParams, size: tuple[int, ...], what: str) -> None:
    """Group sparsity needs blocks that tile the input: refused before any work is queued (from the model's
    card) and by `attribute` itself (from the images)."""
    group = params.group_size
    if params.sparsity == "group" and any(side % group for side in size):
        raise InvalidInput(f"moreaugrad: group_size {group} does not divide {what} {list(size)}",
                           code="invalid_params")


def soft_threshold(v: torch.Tensor, t: float) -> torch.Tensor:
    return v.sign() * (v.abs() - t).clamp_min(0)


def group_shrink(v: torch.Tensor, t: float, g: int) -> torch.Tensor:
    """Block soft-thresholding over all channels x g x g blocks: each block scaled by (1 - t/||block||)+."""
    norms = F.avg_pool2d(v.pow(2).sum(1, keepdim=True), g, stride=g).mul(g * g).sqrt()
    scale = (1 - t / norms.clamp_min(1e-30)).clamp_min(0)
    return v * F.interpolate(scale, scale_factor=g, mode="nearest")


class MoreauGrad(Method):
    name = "moreaugrad"
    title = "MoreauGrad (Zhang & Farnia 2023)"
    Params = MoreauGradParams
    cost_factors = ("iterations", "n_samples")
    iterative = True
    fp32_forward = True
    diagnostics = {"noise_std": "the noise's standard deviation, in model-input units",
                   "averaged_iterates": "how many of the last iterates the map averages",
                   "delta_l1": "L1 norm of the averaged perturbation delta"}

    def forward_in_fp32(self, params: MoreauGradParams) -> bool:  # type: ignore[override]
        if params.precision == "fp16":
            return params.iterations * params.n_samples < WHOLE_PASS_FP16_MIN_DRAWS
        return True

    def check_model(self, model: ServedModel, params: MoreauGradParams) -> None:  # type: ignore[override]
        check_groups(params, model.input_size, f"{model.name}'s input size")

    def steps(self, params):
        return params.iterations

    def batch_cost(self, params):
        return params.n_samples

    def attribute(self, model, x, targets, params, progress=None):
        check_groups(params, tuple(x.shape[-2:]), "the model input size")
        g = params.group_size
        x = x.detach()
        logits = clean_logits(model.module, x, model.max_batch, checkpoint(progress, 0, params.iterations))
        targets = resolve_targets(logits, targets)
        n, batch = params.n_samples, x.shape[0]
        sigma = (params.noise_level * value_range(x)).unsqueeze(1)  # (B,1,1,1,1)
        gens = generators(params.seed, batch, x.device)
        sample_targets = targets.repeat_interleave(n)
        delta = torch.zeros_like(x)
        total = torch.zeros_like(x)
        # the averaged iterates by parity: each draws its own noise, so the two halves' maps differ only as
        # far as the noise moves them (`halves`, the stability of the per-map metrics)
        odd = torch.zeros_like(x)
        averaged = min(AVERAGED_ITERATES, params.iterations)
        threshold = params.lr * params.eta
        for step in range(params.iterations):
            noisy = (x + delta).unsqueeze(1) + sigma * normal_like(x, n, gens)
            grads, _ = input_gradients(model.module, noisy.flatten(0, 1), sample_targets, model.max_batch,
                                       checkpoint(progress, step, params.iterations))
            # d/d delta of mean_z f(x+z+delta) + ||delta||^2/(2 rho), per image
            grad = grads.view(batch, n, *x.shape[1:]).mean(1) + delta / params.rho
            delta = delta - params.lr * grad
            if params.sparsity == "l1":
                delta = soft_threshold(delta, threshold)
            elif params.sparsity == "group":
                delta = group_shrink(delta, threshold, g)
            if step >= params.iterations - averaged:
                total += delta
                if (params.iterations - 1 - step) % 2:
                    odd += delta
            if progress:
                progress(step + 1, params.iterations)
        attribution = -(total / averaged) / params.rho
        diagnostics = [{"noise_std": float(s), "averaged_iterates": averaged, "delta_l1": float(d)}
                       for s, d in zip(sigma.flatten().tolist(),
                                       (total / averaged).abs().flatten(1).sum(1).tolist(), strict=True)]
        halves = None
        if averaged >= 2:
            halves = (heatmap(-(total - odd), params.aggregation, "minmax"),
                      heatmap(-odd, params.aggregation, "minmax"))
        return Attribution(attribution, heatmap(attribution, params.aggregation, params.normalization),
                           diagnostics, logits, targets, halves)
