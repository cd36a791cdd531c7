"""Shared heat-map post-processing: channel aggregation, then normalisation to [0, 1] per image."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


def aggregate_channels(attribution: torch.Tensor, how: str = "abs_sum") -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W)."""
    if how == "abs_sum":
        return attribution.abs().sum(1)
    if how == "sum":
        return attribution.sum(1)
    if how == "max_abs":
        return attribution.abs().amax(1)
    raise ValueError(f"unknown aggregation {how!r}")


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max over all but the first dimension; a constant map becomes all zeros."""
    low, high = _bounds(maps)
    return (maps - low) / (high - low).clamp_min(_EPS)


def _bounds(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image min and max, shaped to broadcast against `maps`. amin/amax: on the CPU, min(1) (which also
    finds indices) and aminmax(dim=1) measured far slower (docs/benchmarks.md, section "Engine: methods vs
    peers", its "Before folding"). Reduced over the dims in place, not over flatten(1): flattening a
    channels_last layer copies it, which costs more than the reduction (section "Memory format")."""
    dims = tuple(range(1, maps.dim()))
    return maps.amin(dims, keepdim=True), maps.amax(dims, keepdim=True)


def per_image_sum(maps: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): each image's sum, without flatten(1)'s copy of a channels_last tensor."""
    return maps.sum(tuple(range(1, maps.dim())))


def minmax_channel_sum(maps: torch.Tensor) -> torch.Tensor:
    """minmax(maps).sum(1, keepdim=True) for (B, C, H, W) maps, summing before scaling: sum_c (m_c - lo) / r
    = (sum_c m_c - C lo) / r, so no scaled copy of every channel is made."""
    low, high = _bounds(maps)
    return (maps.sum(1, keepdim=True) - maps.shape[1] * low) / (high - low).clamp_min(_EPS)


def clip_percentile(maps: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """Clip each map at its q-quantile, then min-max (PAIR's and MoreauGrad's visualisation). A map whose
    nonzero part covers less than 1 - q of it (a sparse gradient: most pixels at the minimum) has its
    quantile at the minimum, where clipping would flatten it to a constant: such a map is clipped at its
    maximum instead (plain min-max), so what it ranks survives."""
    flat = maps.flatten(1)
    top = torch.quantile(flat.float(), q, dim=1).to(maps.dtype).view(-1, *[1] * (maps.dim() - 1))
    low, high = _bounds(maps)
    return minmax(torch.minimum(maps, torch.where(top > low, top, high)))


def normalize(maps: torch.Tensor, how: str = "percentile") -> torch.Tensor:
    if how == "minmax":
        return minmax(maps)
    if how == "percentile":
        return clip_percentile(maps)
    raise ValueError(f"unknown normalization {how!r}")


def heatmap(attribution: torch.Tensor, aggregation: str, normalization: str) -> torch.Tensor:
    return normalize(aggregate_channels(attribution, aggregation), normalization)


def upsample(maps: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=align_corners)
