"""D-RISE (service/detection/drise.py) against oracles: a planted detector whose evidence is known, the
paper's formula written out per mask, RISE's own mask recipe (skimage), and the contract's edges."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from service.detection.base import Detections
from service.detection.drise import (
    BLOCK,
    DriseSettings,
    EarlyStop,
    MaskSampler,
    drise,
    drise_batch,
    mask_weights,
)
from service.errors import Cancelled

H, W = 48, 64  # not square: rows and columns have their own cell size
REGION = (8, 24, 36, 56)  # y1, y2, x1, x2: the pixels the planted box's score reads
BOXES = torch.tensor([[36.0, 8.0, 56.0, 24.0],  # the planted box, over REGION
                      [2.0, 30.0, 20.0, 46.0]])  # a decoy whose score reads no pixel
DECOY_SCORE = 0.9


@pytest.fixture(autouse=True)
def _one_thread():
    """The maps are tiny: a second intra-op thread only waits on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(images: torch.Tensor) -> list[Detections]:
    """Always the same two boxes: the first scored by the mean brightness of REGION, the decoy constant."""
    y1, y2, x1, x2 = REGION
    evidence = images[:, :, y1:y2, x1:x2].mean((1, 2, 3))
    return [Detections(BOXES.clone(), torch.tensor([0, 1]), torch.stack([s, torch.tensor(DECOY_SCORE)]))
            for s in evidence]


def inside() -> torch.Tensor:
    y1, y2, x1, x2 = REGION
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


def image() -> torch.Tensor:
    return torch.full((3, H, W), 0.8)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# 1. the planted detector: the map's mass is in the region it reads; the decoy's map is flat
def test_planted_box_map_falls_in_its_region():
    img = image()
    targets = planted(img[None])[0]
    maps, info = drise(planted, img, targets, 2, DriseSettings(n_masks=500, grid=8), chunk=50)
    assert maps.shape == (2, H, W) and info["n_masks"] == 500 and not info["stopped_early"]
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    box = maps[0]
    assert box[inside()].mean() > 2 * box[~inside()].mean()
    assert inside().flatten()[box.argmax()]
    # the decoy's weight never moves: its displayed map is flat, its raw sum only the masks' coverage
    assert float(maps[1].abs().max()) == 0.0
    raw = info["raw"][1]
    torch.testing.assert_close(raw, DECOY_SCORE * info["coverage"], rtol=1e-4, atol=1e-3)
    assert float(raw.std() / raw.mean()) < 0.1


# 2. a mask hiding the region leaves nothing of the box's evidence: weight ~0
def test_mask_hiding_the_region_weighs_nothing():
    img = image()
    targets = planted(img[None])[0]
    hide = torch.ones(H, W)
    hide[inside()] = 0
    keep = torch.ones(H, W)
    weights = mask_weights(targets, planted(torch.stack([img * hide, img * keep])), 2)
    assert weights.shape == (2, 2)
    assert abs(float(weights[0, 0])) < 1e-6  # the planted box, region hidden
    assert float(weights[0, 1]) == pytest.approx(0.8)  # unmasked: IoU 1 x cos 1 x score 0.8
    assert weights[1].tolist() == pytest.approx([DECOY_SCORE, DECOY_SCORE])  # the decoy does not care


def test_weight_terms_class_cosine_objectness_and_no_detection():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    target = Detections(box, torch.tensor([1]), torch.tensor([0.9]), probs=torch.tensor([[0.0, 0.6, 0.8]]))
    half = torch.tensor([[0.0, 0.0, 10.0, 5.0]])  # IoU 0.5 with the target
    found = Detections(torch.cat([box, half]), torch.tensor([2, 1]), torch.tensor([0.7, 0.9]),
                       probs=torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
                       objectness=torch.tensor([0.5, 1.0]))
    w = mask_weights(target, [found, Detections.empty()], 3)
    # max(1 x cos((0,.6,.8),(0,0,1)) x 0.5, 0.5 x cos(.., (0,1,0)) x 1.0) = max(0.4, 0.3); nothing found: 0
    assert w[0].tolist() == pytest.approx([0.4, 0.0])
    # no probs: one-hot labels, another class has cosine 0; no objectness: the score
    plain = Detections(box, torch.tensor([1]), torch.tensor([0.9]))
    other = Detections(box, torch.tensor([0]), torch.tensor([0.9]))
    assert mask_weights(plain, [plain, other], 2)[0].tolist() == pytest.approx([0.9, 0.0])


# 3. chunking does not change the result: drise at chunk 1, 5 and N against the formula, mask by mask
def paper_loop(detect, img, targets, num_classes, settings):
    """The paper's formula with nothing vectorised: per mask, per target, per detection."""
    sampler = MaskSampler((H, W), settings)
    raw = torch.zeros(len(targets), H, W, dtype=torch.float64)
    coverage = torch.zeros(H, W, dtype=torch.float64)
    weight_sum = torch.zeros(len(targets), dtype=torch.float64)
    weights: list[list[float]] = [[] for _ in range(len(targets))]
    for i in range(settings.n_masks):
        mask = sampler.masks(i, i + 1)[0]
        (found,) = detect((img * mask)[None])
        for t in range(len(targets)):
            best = 0.0
            p_t = targets.class_vectors(num_classes)[t].double()
            for j in range(len(found)):
                p_j = found.class_vectors(num_classes)[j].double()
                cos = float(p_t @ p_j / (p_t.norm() * p_j.norm()))
                best = max(best, iou(targets.boxes[t], found.boxes[j]) * cos
                           * float(found.objectness_or_score()[j]))
            raw[t] += best * mask.double()
            weights[t].append(best)
            weight_sum[t] += best
        coverage += mask.double()
    centred = raw - (weight_sum / settings.n_masks)[:, None, None] * coverage
    low = centred.flatten(1).min(1).values[:, None, None]
    high = centred.flatten(1).max(1).values[:, None, None]
    display = (centred - low) / (high - low)
    # a weight that never changed leaves only rounding in `centred`: shown flat (zeros), not min-maxed
    for t in range(len(targets)):
        if len(set(weights[t])) == 1:
            display[t] = 0
    return raw, display


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    ax1, ay1, ax2, ay2 = a.tolist()
    bx1, by1, bx2, by2 = b.tolist()
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def sharp_planted(images: torch.Tensor) -> list[Detections]:
    """The planted box moves with its evidence (its IoU with the target varies too), plus a second class."""
    y1, y2, x1, x2 = REGION
    evidence = images[:, :, y1:y2, x1:x2].mean((1, 2, 3))
    out = []
    for s in evidence:
        shift = float(8 * (0.8 - s))
        boxes = torch.tensor([[36.0 + shift, 8.0, 56.0 + shift, 24.0], [2.0, 30.0, 20.0, 46.0]])
        probs = torch.stack([torch.stack([s, 1 - s, torch.tensor(0.0)]), torch.tensor([0.1, 0.1, 0.8])])
        out.append(Detections(boxes, probs.argmax(1), probs.amax(1), probs=probs,
                              objectness=torch.stack([torch.sigmoid(10 * (s - 0.4)), torch.tensor(0.7)])))
    return out


def test_chunking_matches_the_formula_mask_by_mask():
    img = image()
    settings = DriseSettings(n_masks=16, grid=5, seed=3)
    targets = sharp_planted(img[None])[0]
    raw, display = paper_loop(sharp_planted, img, targets, 3, settings)
    for chunk in (1, 5, 16):
        maps, info = drise(sharp_planted, img, targets, 3, settings, chunk=chunk)
        torch.testing.assert_close(info["raw"].double(), raw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(maps.double(), display, rtol=1e-4, atol=1e-4)
        assert info["n_masks"] == 16


def test_batched_images_get_their_own_map():
    """Several images in one detector call: each image's maps are the ones it gets alone."""
    imgs = torch.stack([image(), image() * 0.5, image().flip(-1)])
    targets = [sharp_planted(x[None])[0] for x in imgs]
    settings = DriseSettings(n_masks=24, grid=6, seed=5)
    batches: list[int] = []

    def recording(x):
        batches.append(x.shape[0])
        return sharp_planted(x)

    together = drise_batch(recording, imgs, targets, 3, settings, chunk=12)
    assert max(batches) <= 12 and sum(batches) == 3 * 24
    for img, t, (maps, info) in zip(imgs, targets, together, strict=True):
        alone, alone_info = drise(sharp_planted, img, t, 3, settings, chunk=7)
        torch.testing.assert_close(maps, alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(info["raw"], alone_info["raw"], rtol=1e-5, atol=1e-5)


# the masks: RISE's recipe, reproducible whatever range they are asked in
def test_masks_follow_rise_recipe():
    transform = pytest.importorskip("skimage.transform")
    settings = DriseSettings(n_masks=16, grid=6, p=0.3, seed=7)
    sampler = MaskSampler((H, W), settings)
    grids, dy, dx = sampler.grids(0, 4)
    masks = sampler.masks(0, 4)
    cell = (math.ceil(H / 6), math.ceil(W / 6))
    up = (7 * cell[0], 7 * cell[1])
    assert masks.shape == (4, H, W) and grids.dtype == torch.bool
    for i in range(4):
        # RISE's code: skimage's order-1 resize of the grid, cropped at the shift
        rise = transform.resize(grids[i].double().numpy(), up, order=1, mode="reflect", anti_aliasing=False)
        y, x = int(dy[i]), int(dx[i])
        expected = torch.from_numpy(rise[y:y + H, x:x + W]).float()
        # skimage reflects at the border where torch clamps: they differ where a pixel samples the grid
        # outside its outer cell centres, the first and last (s + 1) / s half cells of the upsampled grid
        keep = inner(torch.arange(H) + y, up[0], cell[0], 6)[:, None] \
            & inner(torch.arange(W) + x, up[1], cell[1], 6)[None, :]
        assert keep.float().mean() > 0.5
        torch.testing.assert_close(masks[i][keep], expected[keep], atol=1e-5, rtol=0)


def inner(coords: torch.Tensor, size: int, cell: int, s: int) -> torch.Tensor:
    margin = math.ceil((s + 1) / s * cell / 2)
    return (coords >= margin) & (coords < size - margin)


@pytest.mark.parametrize("size, grid", [((H, W), 6), ((37, 101), 16), ((64, 64), 64), ((5, 3), 2)])
def test_masks_are_the_upsampled_grid_cropped(size, grid):
    """The separable products give torch's bilinear interpolate to (s + 1) x cell, cropped at the shift."""
    sampler = MaskSampler(size, DriseSettings(n_masks=16, grid=grid, seed=4))
    grids, dy, dx = sampler.grids(0, 16)
    cell = (math.ceil(size[0] / grid), math.ceil(size[1] / grid))
    up = F.interpolate(grids[:, None].float(), size=((grid + 1) * cell[0], (grid + 1) * cell[1]),
                       mode="bilinear", align_corners=False)[:, 0]
    expected = torch.stack([up[i, y:y + size[0], x:x + size[1]]
                            for i, (y, x) in enumerate(zip(dy.tolist(), dx.tolist(), strict=True))])
    assert bool((dy < cell[0]).all() and (dx < cell[1]).all())
    torch.testing.assert_close(sampler.masks(0, 16), expected, atol=1e-5, rtol=0)


def test_masks_do_not_depend_on_the_range_asked():
    settings = DriseSettings(n_masks=600, grid=16, p=0.5, seed=1)
    sampler = MaskSampler((H, W), settings)
    whole = sampler.masks(0, 600)
    pieces = torch.cat([MaskSampler((H, W), settings).masks(a, min(a + 37, 600)) for a in range(0, 600, 37)])
    torch.testing.assert_close(whole, pieces)
    across = MaskSampler((H, W), settings).masks(BLOCK - 3, BLOCK + 3)
    torch.testing.assert_close(across, whole[BLOCK - 3:BLOCK + 3])
    # a larger N extends the same sequence; another seed is another one
    assert torch.equal(MaskSampler((H, W), DriseSettings(n_masks=2000, seed=1)).masks(0, 600), whole)
    assert not torch.equal(MaskSampler((H, W), DriseSettings(n_masks=600, seed=2)).masks(0, 600), whole)
    assert float(whole.min()) >= 0 and float(whole.max()) <= 1
    assert float(whole.mean()) == pytest.approx(0.5, abs=0.02)


# 4. bad inputs: ValueError (the API's 422) naming what is wrong
@pytest.mark.parametrize("kwargs, words", [
    ({"n_masks": 0}, "n_masks"), ({"n_masks": 15}, "n_masks"), ({"n_masks": 10_001}, "n_masks"),
    ({"n_masks": 100.0}, "n_masks"), ({"grid": 1}, "grid"), ({"grid": 65}, "grid"), ({"p": 0.0}, "p "),
    ({"p": 1.0}, "p "), ({"p": 1.5}, "p "), ({"p": float("nan")}, "p "), ({"seed": -1}, "seed"),
])
def test_bad_settings_raise_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DriseSettings(**kwargs)


def test_bad_call_raises_value_error():
    img = image()
    targets = planted(img[None])[0]
    with pytest.raises(ValueError, match="chunk"):
        drise(planted, img, targets, 2, DriseSettings(n_masks=16), chunk=0)
    with pytest.raises(ValueError, match="image"):
        drise(planted, img[None], targets, 2, DriseSettings(n_masks=16))
    with pytest.raises(ValueError, match="corr"):
        EarlyStop(corr=1.0)
    with pytest.raises(ValueError, match="target sets"):
        drise_batch(planted, img[None], [targets, targets], 2, DriseSettings(n_masks=16))


# 5. memory follows chunk, not N
def test_detector_calls_and_masks_are_bounded_by_chunk(monkeypatch):
    img = image()
    targets = planted(img[None])[0]
    seen: list[tuple[int, ...]] = []
    made: list[tuple[int, ...]] = []

    def recording(x):
        seen.append(tuple(x.shape))
        return planted(x)

    real = MaskSampler.masks

    def counted(self, start, stop):
        out = real(self, start, stop)
        made.append(tuple(out.shape))
        return out

    monkeypatch.setattr(MaskSampler, "masks", counted)
    drise(recording, img, targets, 2, DriseSettings(n_masks=100), chunk=8)
    assert all(shape[0] <= 8 and shape[1:] == (3, H, W) for shape in seen)
    assert sum(shape[0] for shape in seen) == 100 and len(seen) == 13
    assert max(shape[0] for shape in made) <= 8  # never (N, H, W)
    seen.clear()
    drise_batch(recording, torch.stack([img] * 3), [targets] * 3, 2, DriseSettings(n_masks=16), chunk=2)
    assert max(shape[0] for shape in seen) <= 2 and sum(shape[0] for shape in seen) == 48


# 6. nothing to explain: empty maps, no forward
def test_no_targets_gives_empty_maps():
    calls: list[int] = []

    def counting(x):
        calls.append(x.shape[0])
        return planted(x)

    maps, info = drise(counting, image(), Detections.empty(), 2, DriseSettings(n_masks=16))
    assert maps.shape == (0, H, W) and info["raw"].shape == (0, H, W) and calls == []
    # beside an image that has targets: that one is explained, this one stays empty
    img = image()
    out = drise_batch(counting, torch.stack([img, img]), [Detections.empty(), planted(img[None])[0]], 2,
                      DriseSettings(n_masks=16), chunk=16)
    assert out[0][0].shape == (0, H, W) and out[1][0].shape == (2, H, W) and sum(calls) == 16


def test_progress_and_cancellation():
    img = image()
    targets = planted(img[None])[0]
    reports: list[tuple[int, int]] = []
    drise(planted, img, targets, 2, DriseSettings(n_masks=40), chunk=16,
          on_progress=lambda done, total: reports.append((done, total)))
    assert reports == [(16, 40), (32, 40), (40, 40)]
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        drise(planted, img, targets, 2, DriseSettings(n_masks=40), chunk=8, should_stop=stop_after_two)


def test_early_stop_converges_on_the_full_map():
    def smooth_planted(images):
        y1, y2, x1, x2 = REGION
        s = torch.sigmoid(12 * (images[:, :, y1:y2, x1:x2].mean((1, 2, 3)) - 0.4))
        return [Detections(BOXES[:1].clone(), torch.tensor([0]), v[None]) for v in s]

    img = image()
    targets = smooth_planted(img[None])[0]
    settings = DriseSettings(n_masks=2000, grid=8)
    full, _ = drise(smooth_planted, img, targets, 1, settings, chunk=250)
    reports: list[tuple[int, int]] = []
    maps, info = drise(smooth_planted, img, targets, 1, settings, chunk=250, early_stop=EarlyStop(0.97, 100),
                       on_progress=lambda d, t: reports.append((d, t)))
    assert info["stopped_early"] and info["n_masks"] < 2000 and info["n_masks"] % 100 == 0
    assert info["reliability"] >= 0.97
    assert corr(maps[0], full[0]) > 0.95
    assert reports[-1] == (info["n_masks"], info["n_masks"])  # the total shrinks to what was used
    # where it stops does not depend on the chunk; the masks used are the full run's first ones
    again, again_info = drise(smooth_planted, img, targets, 1, settings, chunk=7,
                              early_stop=EarlyStop(0.97, 100))
    assert again_info["n_masks"] == info["n_masks"]
    torch.testing.assert_close(again, maps, rtol=1e-4, atol=1e-4)
    prefix, _ = drise(smooth_planted, img, targets, 1, DriseSettings(n_masks=info["n_masks"], grid=8),
                      chunk=250)
    torch.testing.assert_close(prefix, maps, rtol=1e-4, atol=1e-4)


def test_halves_split_the_masks():
    img = image()
    targets = planted(img[None])[0]
    maps, info = drise(planted, img, targets, 2, DriseSettings(n_masks=400, grid=8), chunk=64)
    a, b = info["halves"]
    assert a.shape == b.shape == maps.shape
    assert 0.5 < corr(a[0], b[0]) < 0.999  # two independent estimates of one map
    assert corr(a[0] + b[0], maps[0]) > 0.95


def test_device_dtype_of_a_half_precision_image():
    """A half-precision image is masked in its own dtype; the sums stay float32."""
    img = image().half()
    targets = planted(img[None].float())[0]

    def as_float(x):
        assert x.dtype == torch.float16
        return planted(x.float())

    maps, info = drise(as_float, img, targets, 2, DriseSettings(n_masks=16), chunk=16)
    assert maps.dtype == torch.float32 and info["raw"].dtype == torch.float32


def test_upsampling_is_bilinear_not_nearest():
    """The masks are smooth (RISE), not the blocks a nearest-neighbour resize gives."""
    masks = MaskSampler((H, W), DriseSettings(n_masks=16, grid=4)).masks(0, 16)
    values = masks.flatten()
    assert ((values > 0.05) & (values < 0.95)).float().mean() > 0.2
    blocky = F.interpolate((masks[:, None] > 0.5).float(), size=(H, W), mode="nearest")[:, 0]
    assert not torch.equal(blocky, masks)


def test_a_score_that_only_jitters_gives_a_flat_map():
    """A decoy score moving in its last bits (a detector's batch-size-dependent kernels) is no evidence: its
    map stays flat instead of its rounding being min-maxed to [0, 1]."""
    def jittery(images):
        found = planted(images)
        noise = 1e-7 * torch.randn(len(found))
        return [Detections(d.boxes, d.labels, d.scores + torch.stack([torch.tensor(0.0), e]))
                for d, e in zip(found, noise, strict=True)]

    img = image()
    maps, _ = drise(jittery, img, planted(img[None])[0], 2, DriseSettings(n_masks=64, grid=8), chunk=16)
    assert float(maps[1].abs().max()) == 0.0 and float(maps[0].max()) == 1.0


def test_a_detector_returning_the_wrong_count_is_an_error():
    img = image()
    with pytest.raises(RuntimeError, match="results for"):
        drise(lambda x: planted(x)[:1], img, planted(img[None])[0], 2, DriseSettings(n_masks=16), chunk=4)
