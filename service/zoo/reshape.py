"""Reshape transforms: a layer's activation -> a (B, C, h, w) map, for CAM methods.

Each transform is built from the model's own facts (service/zoo/adapters.py), never guessed from the tensor:
- `Tokens`: a ViT's (B, N, C) tokens, its prefix tokens (class, distillation, register) dropped and the rest
  laid on the patch grid (h, w), which need not be square;
- `StageMaps`: Swin's channels-last (B, h, w, C) stage outputs (and the channels-last layers inside ConvNeXt's
  blocks) permuted to (B, C, h, w), the channels-first ones passed through; which is which is read against
  the stages' known (C, h, w) shapes;
- `identity`: CNN layers, already (B, C, h, w).
A tensor that does not fit raises ValueError naming the model and both shapes: a wrong grid is an error,
never a silently scrambled map. Grad-CAM applies the transform to the activation and to its gradient
(pytorch-grad-cam's `reshape_transform` convention, so the same callable serves as one there).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def describe(reshape: ReshapeTransform) -> str:
    """One line saying what the transform does (the family table, GET /v1/models)."""
    text = getattr(reshape, "description", None)
    if text is not None:
        return str(text)
    if reshape is identity:
        return "none (channels-first maps)"
    return getattr(reshape, "__name__", repr(reshape))


@dataclass(frozen=True)
class Tokens:
    """(B, prefix + h*w, C) tokens -> (B, C, h, w); a (B, C, h, w) map at the grid (the patch embedding's
    conv) passes through. `model` names the model in errors."""

    model: str
    prefix: int  # leading tokens that are not patches: class, distillation, registers
    grid: tuple[int, int]  # (h, w) patches

    @property
    def description(self) -> str:
        h, w = self.grid
        return f"tokens: drop {self.prefix} prefix, {h}x{w} patch grid"

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        if t.dim() == 4 and tuple(t.shape[-2:]) == (h, w):
            return t
        if t.dim() != 3 or t.shape[1] != self.prefix + h * w:
            raise ValueError(f"model {self.model!r}: activation {tuple(t.shape)} does not fit {self.prefix} "
                             f"prefix tokens + a {h}x{w} patch grid (expected (B, {self.prefix + h * w}, C))")
        return t[:, self.prefix:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class StageMaps:
    """(B, h, w, C) -> (B, C, h, w) where (C, h, w) is one of the model's stage shapes; (B, C, h, w) at a
    stage shape passes through. Matching whole (C, h, w) shapes, not only the rank, keeps a channels-first
    tensor (Swin's patch-embedding conv) from being permuted into nonsense."""

    model: str
    stages: frozenset[tuple[int, int, int]]  # (C, h, w) of each stage's output

    @property
    def description(self) -> str:
        return "channels-last stages permuted to (C, h, w)"

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            b, c, h, w = t.shape
            if (c, h, w) in self.stages:
                return t
            if (w, c, h) in self.stages:  # (B, h, w, C) read as (b, c, h, w)
                return t.permute(0, 3, 1, 2)
        known = ", ".join(f"{c}x{h}x{w}" for c, h, w in sorted(self.stages))
        raise ValueError(f"model {self.model!r}: activation {tuple(t.shape)} is not a stage map "
                         f"(B, C, h, w) or (B, h, w, C) of a stage (C x h x w: {known})")


def vit_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, 1 + s*s, C) -> (B, C, s, s): one class token and a square grid, pytorch-grad-cam's
    `vit_reshape_transform` convention, for a ViT built by hand. A served model's transform comes from the
    model's facts instead (`Tokens`); any other token count is an error, not a guess."""
    if t.dim() != 3:
        raise ValueError(f"vit reshape expects (B, tokens, C) activations, got {tuple(t.shape)}")
    side = math.isqrt(t.shape[1] - 1)
    return Tokens("?", 1, (side, side))(t)


def swin_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) channels-last -> (B, C, H, W), any 4-D tensor (a served Swin uses `StageMaps`)."""
    if t.dim() != 4:
        raise ValueError(f"swin reshape expects (B, H, W, C) activations, got {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2)
