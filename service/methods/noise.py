"""Seeded per-image noise: image b's draws depend on the seed only, never on its position in a batch."""
from __future__ import annotations

import torch


def generators(seed: int, count: int, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed) for _ in range(count)]


def normal_like(x: torch.Tensor, n: int, gens: list[torch.Generator]) -> torch.Tensor:
    """(B, n, C, H, W) standard normal draws, image b's from gens[b]."""
    return torch.stack([torch.randn((n, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
                        for g in gens])


def value_range(x: torch.Tensor) -> torch.Tensor:
    """max - min of each image over all channels and pixels, shaped (B, 1, 1, 1)."""
    flat = x.flatten(1)
    return (flat.max(1).values - flat.min(1).values).view(-1, 1, 1, 1)
