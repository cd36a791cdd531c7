"""What every method shares: its parameters model, the result type, the target model handle, one verb, and
the facts the rest of the service asks of a method (cost, precision policy, model checks, job-worthiness,
diagnostics), declared on its class: nothing outside service/methods/ keys anything by a method's name."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .passes import Checkpoint, even_chunk, no_checkpoint

# (done, total) steps; may raise to cancel the work. Methods call it before every forward pass too (with the
# steps done so far: `checkpoint`), so a cancelled call stops within one pass whatever the method.
Progress = Callable[[int, int], None]


def checkpoint(progress: Progress | None, done: int = 0, total: int = 1) -> Checkpoint:
    """What a method calls before each forward pass: reports `done` of `total` again (no visible change) and
    lets the caller stop the work there by raising."""
    if progress is None:
        return no_checkpoint
    return lambda: progress(done, total)


Precision = Literal["fp32", "bf16", "fp16"]


class MethodParams(BaseModel):
    """Base of every method's parameters: these models validate requests and describe /v1/methods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Precision | None = Field(
        None, description="fp32, bf16 or fp16 (default: the server's setting). Grad-CAM and FullGrad run "
                          "both passes under autocast; input-gradient methods run the forward in fp32 and "
                          "the backward's conv/linear input-gradients in the reduced dtype (a reduced "
                          "forward flips ReLU6 units and decorrelates their maps); maps stay float32")


class HeatmapParams(MethodParams):
    """How a per-pixel, per-channel attribution becomes a 2-D map in [0, 1]."""

    aggregation: Literal["abs_sum", "sum", "max_abs"] = Field(
        "abs_sum", description="channel aggregation: sum of |a| (default), signed sum, or max of |a|")
    normalization: Literal["percentile", "minmax"] = Field(
        "percentile",
        description="clip at the 99th percentile then scale (SmoothGrad/MoreauGrad code), or min-max")


class SeededParams(MethodParams):
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the method's noise; each image gets its "
                                                          "own generator so results do not depend on "
                                                          "batching")


ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


def _unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


class ServedModel(Protocol):
    """What a method's model checks may read of a served model (service/zoo's LoadedModel has it)."""

    @property
    def name(self) -> str: ...

    @property
    def input_size(self) -> tuple[int, int]: ...

    @property
    def cam_layers(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Explainee:
    """The model as the methods see it. Built from a LoadedModel, or by hand in tests."""

    module: nn.Module
    normalize: Callable[[torch.Tensor], torch.Tensor] = _unchanged  # pixel [0,1] -> model-input space
    cam_layer: str | None = None  # default Grad-CAM layer (dotted module path)
    reshape: ReshapeTransform = _unchanged
    max_batch: int = 64  # memory budget: most images in one forward pass
    # Single-pass methods pad each pass up to the smallest of these sizes (zero images, results dropped), so a
    # GPU meets a few shapes, each warmed once (service/warmup.py); empty: every pass at its own size.
    pass_sizes: tuple[int, ...] = ()


@dataclass
class Attribution:
    """A batch of explanations; row b belongs to image b."""

    # signed, (B, C, H, W) at input resolution (Grad-CAM: (B, 1, h, w) at the layer's)
    attribution: torch.Tensor
    heatmap: torch.Tensor  # (B, H, W) in [0, 1] at model-input resolution
    diagnostics: list[dict[str, Any]]  # per image
    logits: torch.Tensor  # (B, classes) of the clean images: the prediction comes free with it
    targets: torch.Tensor  # (B,) the classes explained (top-1 resolved)
    # A stochastic method's maps (B, H, W) from two independent halves of its random draws, when it has them:
    # how much the map depends on its draws (`stability` of the per-map metrics). None: not stochastic.
    halves: tuple[torch.Tensor, torch.Tensor] | None = None

    def head(self, n: int) -> Attribution:
        """The first n rows: a padded pass's real images."""
        if n == self.heatmap.shape[0]:
            return self
        halves = None if self.halves is None else (self.halves[0][:n], self.halves[1][:n])
        return Attribution(self.attribution[:n], self.heatmap[:n], self.diagnostics[:n], self.logits[:n],
                           self.targets[:n], halves)

    @staticmethod
    def concat(parts: list[Attribution]) -> Attribution:
        if len(parts) == 1:
            return parts[0]
        halves = None
        if all(p.halves is not None for p in parts):
            halves = (torch.cat([p.halves[0] for p in parts if p.halves]),
                      torch.cat([p.halves[1] for p in parts if p.halves]))
        return Attribution(torch.cat([p.attribution for p in parts]), torch.cat([p.heatmap for p in parts]),
                           [d for p in parts for d in p.diagnostics], torch.cat([p.logits for p in parts]),
                           torch.cat([p.targets for p in parts]), halves)


class Method(ABC):
    """One saliency method. `attribute` is the one verb; it holds no per-call state on `self`.

    The class declares what the rest of the service needs to know about it (published by GET /v1/methods):
    - `cost_factors`: the parameters whose product is the forward+backward passes per image (none: 1 pass);
    - `iterative`: its passes run one after another and report progress (long work: the viewer and clients
      run it as a job);
    - `forward_in_fp32(params)`: its precision policy under a reduced `precision`;
    - `check_model(model, params)`: checks of a request against the model it is asked of;
    - `diagnostics`: what each image's `diagnostics` holds, name -> meaning;
    - `redraw(params)`: for a map that depends on a random draw the method does not split into `halves`
      itself, the parameters of the same call with an independent draw (the per-map metrics' `stability`).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    cost_factors: ClassVar[tuple[str, ...]] = ()
    iterative: ClassVar[bool] = False
    diagnostics: ClassVar[dict[str, str]] = {}
    # Whether a reduced-precision request runs the forward in float32 and only the backward's conv/linear
    # input-gradients in the reduced dtype (service/engine.py ReducedBackward), else both passes under
    # autocast. Input-gradient maps of a piecewise-linear net are set by its activation pattern, which a
    # reduced forward flips in places and decorrelates; Grad-CAM and FullGrad maps survive plain autocast
    # (docs/benchmarks.md, "Autocast precision").
    fp32_forward: ClassVar[bool] = False

    def cost(self, params: MethodParams) -> int:
        """Forward+backward passes per image: what admission and the worker queue budget a call with."""
        return math.prod(int(getattr(params, factor)) for factor in self.cost_factors)

    def cost_text(self) -> str:
        """The cost as /v1/methods states it: "1 pass", "n_steps passes", "iterations x n_samples passes"."""
        return " x ".join(self.cost_factors) + " passes" if self.cost_factors else "1 pass"

    def steps(self, params: MethodParams) -> int:
        """Progress steps reported per image (iterations for iterative methods)."""
        return 1

    def batch_cost(self, params: MethodParams) -> int:
        """Images this item adds to each forward pass: what bounds a batch's memory. Equal to `cost` except
        for iterative methods, whose passes run one after another whatever the batch size."""
        return self.cost(params)

    def forward_in_fp32(self, params: MethodParams) -> bool:
        """Under a reduced `precision`, whether the forward stays float32 (see `fp32_forward`)."""
        return self.fp32_forward

    def redraw(self, params: MethodParams) -> MethodParams | None:
        """The parameters of this call with an independent random draw, when its map depends on one and its
        result has no `halves`; None (the default): no such draw (deterministic, or it gives `halves`).

        With the per-map metrics, the engine runs the method again with them (same targets, same precision
        scope, progress and cancel through its checkpoints) and the map's `stability` is the Spearman rank
        correlation of the served map and the redrawn one; the call's cost counts `cost(redraw(params))` more
        passes per image (service/pipeline.py `passes_per_image`)."""
        return None

    def check_model(self, model: ServedModel, params: MethodParams) -> None:  # noqa: B027 - most check nothing
        """Raise InvalidInput when `params` cannot be used with `model` (checked before any work is
        queued)."""

    @abstractmethod
    def attribute(self, model: Explainee, x: torch.Tensor, targets: torch.Tensor, params: MethodParams,
                  progress: Progress | None = None) -> Attribution:
        """x: (B, 3, H, W) in model-input space; targets: (B,) class indices, -1 for the top-1 class.

        The result carries the clean images' logits (from a forward pass the method needs anyway, so
        predicting costs nothing extra) and the resolved targets."""


class SinglePassMethod(Method):
    """Methods that cost one pass per image: split the batch by the memory budget, nothing else to share."""

    def attribute(self, model, x, targets, params, progress=None):
        step = even_chunk(x.shape[0], model.max_batch)
        parts = []
        before_pass = checkpoint(progress)
        for xc, tc in zip(x.split(step), targets.split(step), strict=True):
            before_pass()
            n = xc.shape[0]
            size = padded_size(n, model.pass_sizes)
            if size > n:  # images in a batch are independent (eval mode): the padding changes no real row
                xc = torch.cat([xc, xc.new_zeros((size - n, *xc.shape[1:]))])
                tc = torch.cat([tc, tc.new_full((size - n,), -1)])
            parts.append(self.attribute_chunk(model, xc, tc, params).head(n))
        if progress:
            progress(1, 1)
        return Attribution.concat(parts)

    @abstractmethod
    def attribute_chunk(self, model: Explainee, x: torch.Tensor, targets: torch.Tensor,
                        params: MethodParams) -> Attribution: ...


def padded_size(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest of `sizes` that holds n images; n itself when none does."""
    return min((s for s in sizes if s >= n), default=n)
