"""The engine's front door: predict, pick targets, run a method, return one explanation per image."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input
from torch.overrides import TorchFunctionMode

from .errors import InvalidInput, quote
from .evidence.curves import perturbation_curves
from .evidence.ranks import spearman
from .evidence.spec import MetricsParams
from .methods import Attribution, Method, MethodParams, Progress
from .zoo import LoadedModel


@dataclass
class ClassScore:
    index: int
    label: str
    probability: float


@dataclass
class ImageExplanation:
    target: int
    label: str
    probability: float
    top_k: list[ClassScore]
    heatmap: torch.Tensor  # (H, W) float32 in [0, 1] at model-input resolution, on the CPU
    attribution: torch.Tensor | None  # signed, on the CPU (None when not asked for)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # The heatmap at the size asked for in `map_sizes` (the uploaded image's), on the CPU; None if not asked.
    sized_heatmap: torch.Tensor | None = None
    metrics: dict[str, Any] | None = None  # the per-map metrics, when asked for (`outputs=metrics`)


def check_targets(model: LoadedModel, targets: list[int | None]) -> None:
    for i, t in enumerate(targets):
        if t is not None and not 0 <= t < model.num_classes:
            raise InvalidInput(f"target {quote(t)} for image {i} is out of range: {model.name} has classes "
                               f"0..{model.num_classes - 1}", code="invalid_target")


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _Conv2dReducedGrad(torch.autograd.Function):
    """conv2d in the input's dtype; its input-gradient (a transposed convolution) in `dtype`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, dtype):
        ctx.save_for_backward(weight)
        ctx.conv = x.shape, stride, padding, dilation, groups, dtype
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups, dtype = ctx.conv
        dx = conv2d_input(shape, weight.to(dtype), grad.to(dtype), stride, padding, dilation, groups)
        return dx.to(grad.dtype), None, None, None, None, None, None, None


class _LinearReducedGrad(torch.autograd.Function):
    """linear in the input's dtype; its input-gradient (grad @ W) in `dtype`."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(grad.dtype), None, None, None


def _conv2d_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def _linear_args(input, weight, bias=None):
    return input, weight, bias


class ReducedBackward(TorchFunctionMode):
    """Within it, conv2d and linear calls on the path of an input gradient run their forward as called
    (float32) and their input-gradient in `dtype`. Like autocast, the mode is thread-local. The replacements
    compute no weight gradients, so weights that want them (not the zoo's: loaded frozen) get the plain op."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and torch.is_grad_enabled():
            x, weight, bias, stride, padding, dilation, groups = _conv2d_args(*args, **kwargs)
            if x.requires_grad and not weight.requires_grad and not isinstance(padding, str):  # not "same"
                return _Conv2dReducedGrad.apply(x, weight, bias, stride, padding, dilation, groups,
                                                self.dtype)
        elif func is F.linear and torch.is_grad_enabled():
            x, weight, bias = _linear_args(*args, **kwargs)
            if x.requires_grad and not weight.requires_grad:
                return _LinearReducedGrad.apply(x, weight, bias, self.dtype)
        return func(*args, **kwargs)


def precision_scope(method: Method, params: MethodParams, device: torch.device
                    ) -> tuple[AbstractContextManager, dict[str, str]]:
    """The context a method's passes run in for the request's `precision` (the method's policy,
    `Method.forward_in_fp32`), and diagnostics saying what ran."""
    precision = params.precision or "fp32"
    if precision == "fp32":
        return nullcontext(), {}
    dtype = AUTOCAST[precision]
    if method.forward_in_fp32(params):
        return ReducedBackward(dtype), {"precision_forward": "fp32", "precision_backward": precision}
    ran: dict[str, str] = {"precision_forward": precision, "precision_backward": precision}
    return torch.autocast(device.type, dtype=dtype), ran


def pass_sizes(device: torch.device, max_batch: int) -> tuple[int, ...]:
    """The sizes a single-pass method's passes are padded up to: on a GPU, powers of two up to 32 (where a
    pass is bound by launches, so padding costs little), then multiples of 32 (at most 31 images of padding
    where they cost compute), then `max_batch`; on a CPU none (a pass there costs in proportion to its images,
    and a new shape costs little).

    Why pad on a GPU: PyTorch keeps cuDNN's execution plans in a thread-local cache keyed by shape, and
    building the plans of a new batch size takes seconds even with autotuning off. A batching server meets a
    new size at almost every batch until it has seen them all, and every queued request waits
    (docs/benchmarks.md, "GPU: NVIDIA H100, second run").
    """
    if device.type != "cuda":
        return ()
    sizes = [size for size in (1, 2, 4, 8, 16) if size < max_batch]
    sizes += range(32, max_batch, 32)
    return (*sizes, max_batch)


def explain(model: LoadedModel, method: Method, x: torch.Tensor, targets: list[int | None],
            params: MethodParams, *, progress: Progress | None = None, top_k: int = 5, max_batch: int = 64,
            keep_attribution: list[bool] | None = None,
            map_sizes: list[tuple[int, int] | None] | None = None,
            metrics: MetricsParams | None = None) -> list[ImageExplanation]:
    """x: (B, 3, H, W) preprocessed images; a None target means the top-1 class of that image.

    The prediction comes from the forward pass the method makes anyway (no extra pass); maps are copied to
    the CPU once, and signed attributions only for the images in `keep_attribution` (default all).
    `map_sizes`: per image, a (height, width) to resize its heatmap to as well (`sized_heatmap`).
    `metrics`: also each map's per-map metrics (service/evidence), forward passes after the method's, in the
    same batch; for a method with an independent draw to compare with (`Method.redraw`), the method's passes
    again with it first (progress counts its steps after the method's own).
    """
    check_targets(model, targets)
    x = x.to(model.device, non_blocking=True)
    wanted = torch.tensor([-1 if t is None else t for t in targets], device=model.device)
    scope, ran = precision_scope(method, params, model.device)
    explainee = model.explainee(max_batch, pass_sizes(model.device, max_batch))
    reported = [0, 1]  # the last progress report: the metrics' passes report it again

    def tracked(done: int, total: int) -> None:
        reported[:] = [done, total]
        if progress is not None:
            progress(done, total)

    redraw = method.redraw(params) if metrics is not None else None
    before, after = method.steps(params), (0 if redraw is None else method.steps(redraw))
    reports = progress is not None
    with scope:
        result = method.attribute(explainee, x, wanted, params,
                                  _within(tracked, 0, after) if reports else None)
        redrawn = None if redraw is None else method.attribute(
            explainee, x, result.targets, redraw, _within(tracked, before, 0) if reports else None)
    probabilities = result.logits.float().softmax(1)
    top_p, top_i = probabilities.topk(min(top_k, model.num_classes), dim=1)
    chosen = result.targets
    chosen_p = probabilities.gather(1, chosen.view(-1, 1)).squeeze(1).tolist()
    heat_on_device = result.heatmap.float()
    evidence = [None] * x.shape[0] if metrics is None else per_map_metrics(
        explainee, x, result, chosen_p, metrics, lambda: tracked(*reported), redrawn)
    sized = resize_maps(heat_on_device, map_sizes or [None] * x.shape[0])
    heat = heat_on_device.cpu()
    keep = keep_attribution if keep_attribution is not None else [True] * x.shape[0]
    out = []
    for b, (target, top_ib, top_pb) in enumerate(zip(chosen.tolist(), top_i.tolist(), top_p.tolist(),
                                                     strict=True)):
        out.append(ImageExplanation(
            target=target, label=model.labels[target], probability=chosen_p[b],
            top_k=[ClassScore(i, model.labels[i], p) for i, p in zip(top_ib, top_pb, strict=True)],
            heatmap=heat[b], attribution=result.attribution[b].float().cpu() if keep[b] else None,
            diagnostics={**result.diagnostics[b], **ran}, sized_heatmap=sized[b], metrics=evidence[b]))
    return out


def _within(report: Progress, before: int, after: int) -> Progress:
    """A run's progress reports as part of a longer run: `before` steps done ahead of it, `after` to come."""
    return lambda done, total: report(before + done, before + total + after)


def per_map_metrics(explainee, x: torch.Tensor, result: Attribution, clean_p: list[float],
                    metrics: MetricsParams, checkpoint, redrawn: Attribution | None = None
                    ) -> list[dict[str, Any] | None]:
    """Each map's deletion and insertion curves against a random order (forward passes in float32, outside
    the method's precision scope), and the stability of a stochastic method's map: the Spearman rank
    correlation of two maps from independent random draws, the served map and `redrawn`'s (the same call with
    the method's independent draw, `Method.redraw`) when given, else the maps of the two halves of its
    draws (`Attribution.halves`); None for a deterministic method."""
    curves = perturbation_curves(explainee, x, result.heatmap.float(), result.targets, steps=metrics.steps,
                                 replacement=metrics.replacement, checkpoint=checkpoint,
                                 clean_probabilities=clean_p)
    pair = (result.heatmap, redrawn.heatmap) if redrawn is not None else result.halves
    out: list[dict[str, Any] | None] = []
    for b, curve in enumerate(curves):
        stability = None if pair is None else spearman(pair[0][b].float(), pair[1][b].float())
        out.append({**curve.as_dict(), "stability": stability})
    return out


def resize_maps(heat: torch.Tensor, sizes: list[tuple[int, int] | None]) -> list[torch.Tensor | None]:
    """Each (H, W) map of `heat` (B, H, W) resized bilinearly to its (height, width), then copied to the CPU.

    Pillow's bilinear (half-pixel centres; a widened, antialiasing filter when shrinking), which encoding
    used to run per image in a request thread: here it runs where the map already is, on the device or in
    the worker's torch threads, several times faster than Pillow's float resampler on a CPU.
    """
    out: list[torch.Tensor | None] = []
    for b, size in enumerate(sizes):
        if size is None or tuple(size) == tuple(heat.shape[-2:]):
            out.append(None)
            continue
        shrink = size[0] < heat.shape[-2] or size[1] < heat.shape[-1]
        resized = F.interpolate(heat[b][None, None], size=tuple(size), mode="bilinear", align_corners=False,
                                antialias=shrink)
        out.append(resized[0, 0].clamp_(0.0, 1.0).cpu())
    return out
