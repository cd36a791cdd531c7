"""The most salient region of a map: the connected blob around its peak, above a threshold.

Labeling tools want a mask and a box, not a float map; the integrations share this one definition.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SalientRegion:
    mask: np.ndarray  # bool HxW: the blob that holds the map's maximum
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, exclusive ends (x2 - x1 = width)
    peak: float  # the map's maximum

    @property
    def box_percent(self) -> tuple[float, float, float, float]:
        """x, y, width, height in percent of the image (Label Studio's rectangle convention)."""
        h, w = self.mask.shape
        x1, y1, x2, y2 = self.box
        return 100 * x1 / w, 100 * y1 / h, 100 * (x2 - x1) / w, 100 * (y2 - y1) / h


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """4-connected flood fill from `seed` within `allowed`, by repeated dilation (numpy only, no scipy)."""
    region = seed & allowed
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= allowed
        if np.array_equal(grown, region):
            return region
        region = grown


def salient_region(heat: np.ndarray, threshold: float = 0.5) -> SalientRegion:
    """`threshold` is relative to the map's peak (0.5: at least half as salient as the most salient pixel)."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"a saliency map must be a non-empty HxW array, not {heat.shape}")
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    peak = float(heat.max())
    seed = np.zeros(heat.shape, dtype=bool)
    seed[np.unravel_index(int(np.argmax(heat)), heat.shape)] = True
    # a flat (all-zero) map has no salient region: the whole image, as the peak pixel's blob, would mislead
    mask = _grow(seed, heat >= threshold * peak) if peak > 0 else seed
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return SalientRegion(mask=mask, box=box, peak=peak)
