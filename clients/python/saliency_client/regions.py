"""The most salient region of a map: the connected blob, above a threshold of the smoothed map, that holds the
most saliency.

Labeling tools want a mask and a box, not a float map; the integrations share this one definition.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SalientRegion:
    mask: np.ndarray  # bool HxW: the blob that holds the most saliency (see salient_region)
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, exclusive ends (x2 - x1 = width)
    peak: float  # the map's maximum

    @property
    def box_percent(self) -> tuple[float, float, float, float]:
        """x, y, width, height in percent of the image (Label Studio's rectangle convention)."""
        h, w = self.mask.shape
        x1, y1, x2, y2 = self.box
        return 100 * x1 / w, 100 * y1 / h, 100 * (x2 - x1) / w, 100 * (y2 - y1) / h


def _smoothing_size(shape: tuple[int, ...]) -> int:
    """The side of the square box filter: an odd number of pixels near 1/32 of the map's shorter side, at
    least 3 (7 on a 224x224 map, 95 on a 4000x3000 one: the same share of the image at the input size and
    the original size)."""
    return max(3, round(min(shape) / 32) | 1)


def salient_region(heat: np.ndarray, threshold: float = 0.5) -> SalientRegion:
    """The most salient region of `heat` (HxW, the service's maps are in [0, 1]).

    1. Smooth the map with a box filter (`_smoothing_size`, edges mirrored).
    2. Keep the pixels at `threshold` x the smoothed map's maximum or above (0.5: at least half as salient as
       the most salient neighbourhood), and split them into 4-connected blobs.
    3. The region is the blob that holds the most saliency: the largest sum of the unsmoothed map over it
       (on an exact tie, the first blob in row-major order).

    Why not simply the blob around the map's argmax: the service normalises a map at its 99th percentile,
    so its top 1% is a plateau at exactly 1.0, and the argmax is merely the plateau's first (top-left) pixel.
    On a noisy map (Integrated Gradients, plain gradients) that plateau is scattered speckles, and the blob
    around the first of them is an arbitrary speckle. Smoothing spreads an isolated speckle over its
    neighbourhood, so it no longer reaches the threshold, and joins pixels that are salient together into
    one blob; ranking the blobs by mass picks the object rather than a lucky pixel. On a smooth map
    (Grad-CAM) with one blob the box is the blob around the peak within a pixel or so; the mask's corners
    are rounded by the filter.

    A map whose smoothed maximum is not above 0 (all zero) has no salient region: the mask is its argmax pixel
    alone (the first pixel), never the whole image, which would mislead. A constant positive map is one blob,
    the whole image.
    """
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"a saliency map must be a non-empty HxW array, not {heat.shape}")
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    peak = float(heat.max())
    smooth = ndimage.uniform_filter(heat, _smoothing_size(heat.shape), mode="reflect")
    top = float(smooth.max())
    if top > 0:
        # scipy's labelling: growing a blob by repeated numpy dilation took seconds on a 12 MP map
        components, count = ndimage.label(smooth >= threshold * top)
        if count == 1:
            mask = components == 1
        else:
            mass = np.bincount(components.ravel(), weights=heat.ravel(), minlength=count + 1)
            mask = components == 1 + int(np.argmax(mass[1:]))
    else:
        mask = np.zeros(heat.shape, dtype=bool)
        mask[np.unravel_index(int(np.argmax(heat)), heat.shape)] = True
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return SalientRegion(mask=mask, box=box, peak=peak)


def salient_region_in_box(heat: np.ndarray, box: tuple[float, float, float, float] | list[float],
                          threshold: float = 0.5) -> SalientRegion:
    """The most salient region of a detection's map within its box: salient_region of the box's crop, placed
    back in the whole map (the mask is False outside the box; `box` is the region's, `peak` the crop's).

    `box` is (x1, y1, x2, y2) in the map's pixels, rounded outward to whole pixels and clipped to the map (at
    least one pixel). Why within the box: a labeling tool's mask of a detection's label belongs on the object;
    the evidence D-RISE finds outside the box (context) stays in the float map (Label Studio's brush,
    FiftyOne's Heatmap), which this does not replace.
    """
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"a saliency map must be a non-empty HxW array, not {heat.shape}")
    h, w = heat.shape
    x1 = min(max(int(np.floor(box[0])), 0), w - 1)
    y1 = min(max(int(np.floor(box[1])), 0), h - 1)
    x2 = max(min(int(np.ceil(box[2])), w), x1 + 1)
    y2 = max(min(int(np.ceil(box[3])), h), y1 + 1)
    inner = salient_region(heat[y1:y2, x1:x2], threshold)
    mask = np.zeros(heat.shape, dtype=bool)
    mask[y1:y2, x1:x2] = inner.mask
    bx1, by1, bx2, by2 = inner.box
    return SalientRegion(mask=mask, box=(bx1 + x1, by1 + y1, bx2 + x1, by2 + y1), peak=inner.peak)
