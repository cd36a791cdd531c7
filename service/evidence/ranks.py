"""Spearman's rank correlation of two maps (average ranks for ties, as scipy.stats), on torch tensors: used by
the stability of a stochastic method's map (engine) and by the sanity report (sanity.py). Written here rather
than taken from scipy, which the server's runtime does not depend on."""
from __future__ import annotations

import torch


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given the average of the ranks they span (scipy.stats.rankdata's
    default, "average"), as float64."""
    v = values.detach().flatten().double()
    n = v.numel()
    order = torch.argsort(v, stable=True)
    ordered = v[order]
    starts_group = torch.ones(n, dtype=torch.bool, device=v.device)
    starts_group[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(starts_group.long(), 0) - 1  # each sorted position's tie group
    counts = torch.bincount(group).double()
    last = torch.cumsum(counts, 0)  # the 1-based rank of each group's last member
    average = last - (counts - 1) / 2
    ranks = torch.empty(n, dtype=torch.float64, device=v.device)
    ranks[order] = average[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps of the same size: Pearson's correlation of their average
    ranks. A constant map has no ranking to keep: its correlation with anything is taken as 0 here (scipy
    answers nan)."""
    if a.numel() != b.numel():
        raise ValueError(f"maps of different sizes: {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if norm.item() == 0.0:
        return 0.0
    return float((ra * rb).sum() / norm)
