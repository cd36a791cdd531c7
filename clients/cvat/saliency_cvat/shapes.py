"""A thresholded saliency region in CVAT's shape vocabularies (binary masks: CVAT has no float maps)."""
from __future__ import annotations

import numpy as np


def outline_polygon(mask: np.ndarray, max_bands: int = 64) -> list[float]:
    """A staircase polygon down the region's left edge and up its right edge, in at most `max_bands` bands
    of rows; each band spans its rows' widest extent, so the polygon covers the region and shares its box.

    Exact for regions with no horizontal gaps (a blob around a peak usually has none); a gap is filled.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        raise ValueError("empty mask")
    left, right = [], []
    for band in np.array_split(rows, min(max_bands, rows.size)):
        cols = np.flatnonzero(mask[band].any(axis=0))
        top, bottom = float(band[0]), float(band[-1] + 1)
        left += [(float(cols.min()), top), (float(cols.min()), bottom)]
        right += [(float(cols.max() + 1), top), (float(cols.max() + 1), bottom)]
    return [c for xy in left + right[::-1] for c in xy]


def nuclio_mask(mask: np.ndarray, box: tuple[int, int, int, int]) -> list[int]:
    """The serverless detector format: the box's crop, 0/255 row-major,
    then [xtl, ytl, xbr, ybr] inclusive."""
    x1, y1, x2, y2 = box
    crop = mask[y1:y2, x1:x2].astype(np.uint8) * 255
    return crop.ravel().tolist() + [x1, y1, x2 - 1, y2 - 1]
