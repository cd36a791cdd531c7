"""salient_region: the blob, above a threshold of the box-smoothed map, that holds the most saliency (not the
blob around the first pixel of the 99th-percentile plateau)."""
from __future__ import annotations

import numpy as np
import pytest

from saliency_client import salient_region
from saliency_client.regions import _smoothing_size


def _flood(allowed: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """A plain breadth-first 4-connected fill."""
    mask, todo = np.zeros_like(allowed), [seed]
    while todo:
        y, x = todo.pop()
        if 0 <= y < allowed.shape[0] and 0 <= x < allowed.shape[1] and allowed[y, x] and not mask[y, x]:
            mask[y, x] = True
            todo += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return mask


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _old_box(heat: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """The previous definition: the blob of raw pixels at threshold x the peak or above holding the argmax."""
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return _box(_flood(heat >= threshold * heat.max(), (int(peak[0]), int(peak[1]))))


def _oracle(heat: np.ndarray, threshold: float) -> np.ndarray:
    """The documented definition written out naively: a k x k mean, mirrored edges, flood fills, masses."""
    k = _smoothing_size(heat.shape)
    r = k // 2
    padded = np.pad(heat.astype(np.float64), r, mode="symmetric")
    h, w = heat.shape
    smooth = sum(padded[dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)) / (k * k)
    allowed = smooth >= threshold * smooth.max()
    seen = np.zeros_like(allowed)
    best, best_mass = None, -np.inf
    for y, x in zip(*np.nonzero(allowed), strict=True):  # row-major: the first blob wins an exact tie
        if not seen[y, x]:
            blob = _flood(allowed, (int(y), int(x)))
            seen |= blob
            if heat[blob].sum() > best_mass:
                best, best_mass = blob, heat[blob].sum()
    assert best is not None
    return best


def _speckled(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A noisy map after the 99th-percentile normalisation: its top 1% is single-pixel speckles clipped to
    1.0, the first of them in the top-left corner (so the argmax is there)."""
    heat = rng.random(shape).astype(np.float32) * 0.2
    speckles = rng.choice(heat.size, heat.size // 100, replace=False)
    heat.flat[speckles] = 1.0
    heat[0, 0] = 1.0
    return heat


def _near(box: tuple[int, ...], expected: tuple[int, ...], slack: int) -> bool:
    return all(abs(a - b) <= slack for a, b in zip(box, expected, strict=True))


def test_the_region_is_the_blob_that_holds_the_mass_not_the_first_speckle_of_the_plateau():
    rng = np.random.default_rng(0)
    heat = _speckled(rng, (224, 224))
    heat[120:160, 60:100] = 0.9  # compact, slightly below the plateau, most of the mass
    # the old definition's seed: the top-left speckle
    assert np.argmax(heat) == 0 and (heat == 1.0).sum() >= 400
    assert _old_box(heat, 0.5)[:2] == (0, 0)
    for threshold in (0.3, 0.5, 0.8):
        region = salient_region(heat, threshold)
        # a sharp edge on the background noise moves by at most half the 7-pixel filter
        assert _near(region.box, (60, 120, 100, 160), 3), (threshold, region.box)
        assert region.mask[123:157, 63:97].all() and region.peak == 1.0
    # the same map at 4x the size (a map at the original size is the input-size map resized): the same region
    big = salient_region(np.kron(heat, np.ones((4, 4), np.float32)), 0.5)
    assert _near(big.box, (240, 480, 400, 640), 8), big.box


def test_a_cloud_of_salient_speckles_is_found_as_one_region():
    """Integrated Gradients / gradient maps: the object is a cloud of scattered salient pixels, not a solid
    blob; elsewhere the plateau is spread as lone speckles."""
    rng = np.random.default_rng(1)
    heat = _speckled(rng, (224, 224))
    cloud = rng.random((60, 70)) < 0.35
    heat[100:160, 30:100][cloud] = rng.uniform(0.4, 1.0, int(cloud.sum())).astype(np.float32)
    region = salient_region(heat, 0.5)
    x1, y1, x2, y2 = region.box
    inter = max(0, min(x2, 100) - max(x1, 30)) * max(0, min(y2, 160) - max(y1, 100))
    union = (x2 - x1) * (y2 - y1) + 60 * 70 - inter
    assert inter / union > 0.8, region.box


def test_a_clean_blob_keeps_the_box_of_the_blob_around_the_peak():
    yy, xx = np.mgrid[0:224, 0:224]
    # the last bump is cut off by the image's edge
    for cy, cx, sy, sx in ((110, 90, 25, 35), (60, 170, 12, 18), (200, 20, 30, 30)):
        bump = np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
        heat = np.clip(bump / np.percentile(bump, 99), 0, 1).astype(np.float32)  # the service's normalisation
        for threshold in (0.3, 0.5, 0.7):
            box = salient_region(heat, threshold).box
            assert _near(box, _old_box(heat, threshold), 2), (cy, cx, threshold, box)


def test_a_plateau_blob_keeps_its_box_and_a_second_blob_is_left_out():
    heat = np.zeros((40, 60), np.float32)
    heat[5:15, 10:30] = 0.9
    heat[8, 12] = 1.0
    heat[25:35, 40:50] = 0.8  # a second blob, not connected to the first, with less mass
    region = salient_region(heat, 0.5)
    assert region.box == (10, 5, 30, 15) and region.peak == 1.0
    assert 196 <= region.mask.sum() <= 200 and region.mask[5:15, 10:30].sum() == region.mask.sum()
    assert region.box_percent == pytest.approx((100 * 10 / 60, 100 * 5 / 40, 100 * 20 / 60, 100 * 10 / 40))


def test_the_blob_with_more_mass_wins_over_the_one_with_the_higher_peak():
    heat = np.zeros((40, 60), np.float32)
    heat[2:5, 2:5] = 1.0  # the peak, 9 pixels
    heat[20:30, 30:50] = 0.8  # 200 pixels, above half the smoothed peak
    assert salient_region(heat, 0.5).box == (30, 20, 50, 30)


def test_a_zero_map_has_no_region_and_a_constant_map_is_all_region():
    zero = salient_region(np.zeros((4, 6), np.float32))
    assert zero.mask.sum() == 1 and zero.mask[0, 0] and zero.box == (0, 0, 1, 1) and zero.peak == 0.0
    flat = salient_region(np.full((30, 50), 0.4, np.float32), 0.9)
    assert flat.mask.all() and flat.box == (0, 0, 50, 30) and flat.peak == pytest.approx(0.4)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, 2.0, float("nan")])
def test_threshold_outside_0_1_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        salient_region(np.ones((8, 8), np.float32), threshold)


@pytest.mark.parametrize("heat", [np.zeros((0, 4)), np.zeros(5), np.zeros((2, 3, 4))])
def test_a_map_must_be_a_nonempty_2d_array(heat):
    with pytest.raises(ValueError, match="HxW"):
        salient_region(heat)


def test_threshold_one_is_accepted():
    assert salient_region(np.ones((8, 8), np.float32), 1.0).mask.any()


@pytest.mark.parametrize("seed", range(4))
def test_salient_region_equals_the_definition_written_out(seed):
    rng = np.random.default_rng(seed)
    shape = ((30, 45), (64, 48), (170, 150), (12, 200))[seed]
    heat = rng.random(shape).astype(np.float32) ** 3
    for _ in range(3):  # a few blobs of random size and level on the noise
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        heat[y:y + rng.integers(3, 30), x:x + rng.integers(3, 30)] += rng.uniform(0.2, 0.8)
    for threshold in (0.3, 0.6, 0.9):
        region = salient_region(heat, threshold)
        expected = _oracle(heat, threshold)
        np.testing.assert_array_equal(region.mask, expected)
        assert region.box == _box(expected)


def test_smoothing_scales_with_the_map():
    assert [_smoothing_size(s) for s in ((4, 4), (40, 60), (224, 224), (3000, 4000))] == [3, 3, 7, 95]
