"""Reshape transforms: token activations of ViT/Swin layers -> (B, C, h, w) maps, for CAM methods."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def vit_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, N, C) with leading class/register tokens -> (B, C, s, s), s = the largest square that fits."""
    if t.dim() != 3:
        raise ValueError(f"vit reshape expects (B, tokens, C) activations, got {tuple(t.shape)}")
    side = math.isqrt(t.shape[1])
    patches = t[:, t.shape[1] - side * side:, :]
    return patches.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)


def swin_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) channels-last stage output -> (B, C, H, W)."""
    if t.dim() != 4:
        raise ValueError(f"swin reshape expects (B, H, W, C) activations, got {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2)


RESHAPES: dict[str, ReshapeTransform] = {"none": identity, "vit": vit_tokens, "swin": swin_tokens}
