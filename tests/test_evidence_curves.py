"""Deletion and insertion curves (service/evidence/curves.py) against their oracles: Quantus's PixelFlipping
for the deletion curves (map order and random order), exact identities for insertion, a naive
one-image-at-a-time reference for every substrate, a planted model whose true map is known, and the limits
(one pixel a step, end points, forward count, batching, cancellation, bad arguments)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.evidence.curves import (
    REPLACEMENTS,
    Curves,
    blur,
    forwards_per_image,
    perturbation_curves,
    random_order,
    rise_kernel,
    substrate,
    trapezoid_auc,
)
from service.methods import Explainee
from tests.nets import CamNet

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet's per-channel affine map, as service/zoo's Preprocessor.normalize."""
    mean = torch.tensor(MEAN, dtype=pixels.dtype).view(3, 1, 1)
    std = torch.tensor(STD, dtype=pixels.dtype).view(3, 1, 1)
    return (pixels - mean) / std


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x)


class Counting(nn.Module):
    """Records the images of every forward pass."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.passes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(x.shape[0])
        return self.inner(x)


def random_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    """CamNet with random weights, its head scaled up so the probabilities move (not all ~1/classes)."""
    torch.manual_seed(seed)
    net = CamNet(classes)
    with torch.no_grad():
        net.fc.weight.mul_(40.0)
    return net.eval()


def images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 3, size, size), generator=g)
    x[:, 0, 0, 0] = 0.0  # every image's minimum is 0: Quantus's "black" (the image's min) is pixel value 0
    return x


def tie_free_maps(batch: int = 3, size: int = 32, seed: int = 2) -> torch.Tensor:
    maps = torch.rand((batch, size, size), generator=torch.Generator().manual_seed(seed))
    assert all(len(torch.unique(m)) == size * size for m in maps)
    return maps


def probability(module: nn.Module, image: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        return module(image[None]).softmax(1)[0, target].item()


def reference(module: nn.Module, x: torch.Tensor, heat: torch.Tensor, target: int, steps: int,
              base: torch.Tensor, order: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """One image's (deletion, insertion) curves, the naive way: every perturbed image built on its own from
    the order (numpy's stable argsort of -map: ties in raster order), every point its own forward pass."""
    height, width = heat.shape
    pixels = height * width
    if order is None:
        order = np.argsort(-heat.flatten().numpy(), kind="stable")
    per_step = pixels // steps
    counts = [k * per_step for k in range(steps)] + [pixels]
    deletion, insertion = [], []
    for count in counts:
        mask = torch.zeros(pixels, dtype=torch.bool)
        mask[torch.as_tensor(order[:count])] = True
        mask = mask.view(height, width)
        deletion.append(probability(module, torch.where(mask, base, x), target))
        insertion.append(probability(module, torch.where(mask, x, base), target))
    return deletion, insertion


# --- Quantus, the oracle of the deletion curves -------------------------------------------------------------

@pytest.fixture(scope="module")
def quantus():
    # Quantus 0.6.0 calls np.trapz, which numpy 2.4 removed; np.trapezoid is the same function under its new
    # name (numpy is not downgraded for a test oracle).
    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid
    import quantus  # the Makefile installs it (make venv): an oracle that is missing fails, never skips

    return quantus


def pixel_flipping(quantus, model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                   steps: int, auc: bool = False) -> np.ndarray:
    """quantus.PixelFlipping with our game's parameters: a step of H*W/steps pixels is C*H*W/steps features
    (Quantus flattens (C, H, W) and broadcasts a (1, H, W) map over the channels; a pixel's C equal values are
    neighbours in its order, so a step never splits a pixel), the "black" baseline (the image's minimum, 0
    here), softmax probabilities, the map as given (no normalisation, no abs: the order is what counts)."""
    channels, height, width = x.shape[1:]
    # Quantus asserts that features_in_step divides H*W (its check reads (H, W) though its step counts
    # (C, H, W) features): so C*H*W/steps divides H*W, i.e. steps is a multiple of C (24 x 24, 12 steps).
    assert (height * width) % (channels * (height * width // steps)) == 0
    metric = quantus.PixelFlipping(features_in_step=channels * height * width // steps,
                                   perturb_baseline="black", normalise=False, abs=False,
                                   return_auc_per_sample=auc, disable_warnings=True)
    scores = metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=maps[:, None].numpy(),
                    channel_first=True, softmax=True, device="cpu")
    return np.asarray(scores, dtype=np.float64)


def test_deletion_equals_quantus_pixel_flipping(quantus):
    """Quantus's PixelFlipping curve is our deletion curve without its first point (Quantus records after each
    step only; our point 0 is the untouched image). Its AUC is np.trapz(curve, dx=1) over those K points, so
    ours = (quantus_auc + (p_untouched + quantus_curve[0]) / 2) / K."""
    model, x, maps, steps = random_cnn(), images(size=24), tie_free_maps(size=24), 12
    targets = torch.tensor([0, 3, 4])
    ours = perturbation_curves(Explainee(model, max_batch=20), x, maps, targets, steps=steps,
                               replacement="black")
    curves = pixel_flipping(quantus, model, x, maps, targets, steps)
    aucs = pixel_flipping(quantus, model, x, maps, targets, steps, auc=True)
    assert curves.shape == (3, steps)
    for b, c in enumerate(ours):
        assert max(c.deletion) - min(c.deletion) > 0.02  # the curves move 2000 times the tolerance
        np.testing.assert_allclose(c.deletion[1:], curves[b], atol=1e-5, rtol=0)
        untouched = probability(model, x[b], int(targets[b]))
        np.testing.assert_allclose(c.deletion[0], untouched, atol=1e-6)
        assert c.deletion_auc == pytest.approx((aucs[b] + (untouched + curves[b][0]) / 2) / steps, abs=1e-5)


def test_random_order_deletion_equals_quantus_with_that_order(quantus):
    """Our random curve is Quantus's curve for a map that ranks the pixels in our random order."""
    model, x, steps = random_cnn(3), images(2, size=24, seed=4), 24
    with torch.no_grad():
        targets = model(x).argmax(1)  # the top-1 classes: their probabilities fall as the pixels go
    perm = random_order(24 * 24, seed=7)
    ranked = torch.empty(24 * 24)
    ranked[perm] = -torch.arange(24 * 24, dtype=torch.float32)  # first in the order = largest
    ours = perturbation_curves(Explainee(model), x, tie_free_maps(2, size=24), targets, steps=steps,
                               replacement="black", seed=7)
    curves = pixel_flipping(quantus, model, x, ranked.view(1, 24, 24).expand(2, -1, -1), targets, steps)
    for b, c in enumerate(ours):
        assert max(c.deletion_random) - min(c.deletion_random) > 0.02
        np.testing.assert_allclose(c.deletion_random[1:], curves[b], atol=1e-5, rtol=0)


def test_black_is_pixel_zero_through_normalize(quantus):
    """A model taking normalised input: our "black" is normalize(0), Quantus's black is 0 in the pixel space
    of the same model with the normalisation in front."""
    model, pixels, maps, steps = random_cnn(5), images(size=24, seed=6), tie_free_maps(size=24, seed=8), 12
    targets = torch.tensor([2, 0, 1])
    ours = perturbation_curves(Explainee(model, normalize=normalize), normalize(pixels), maps, targets,
                               steps=steps, replacement="black")
    curves = pixel_flipping(quantus, nn.Sequential(Normalize(), model).eval(), pixels, maps, targets, steps)
    for b, c in enumerate(ours):
        np.testing.assert_allclose(c.deletion[1:], curves[b], atol=1e-5, rtol=0)


def test_steps_with_a_remainder_equal_quantus_less_its_extra_point(quantus):
    """K not dividing H*W (24 x 24, K = 10: steps of 57 pixels, our last one taking the remainder, 63):
    Quantus's PixelFlipping with 57-pixel steps makes 11, its last of 6 pixels, so its 10th point (570 pixels
    gone) is not one of ours and the others are. Its features_in_step check (which reads (H, W), see
    `pixel_flipping`) is skipped: at 224 x 224 with C = 3 no K passes it, and bench/metrics.py compares the
    real model's curves the same way."""

    class Flipping(quantus.PixelFlipping):
        def custom_preprocess(self, x_batch, **kwargs):
            return None

    model, x, maps, steps = random_cnn(7), images(2, size=24, seed=51), tie_free_maps(2, size=24, seed=52), 10
    targets = torch.tensor([1, 4])
    ours = perturbation_curves(Explainee(model, max_batch=16), x, maps, targets, steps=steps,
                               replacement="black")
    metric = Flipping(features_in_step=3 * (24 * 24 // steps), perturb_baseline="black", normalise=False,
                      abs=False, disable_warnings=True)
    curves = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(),
                               a_batch=maps[:, None].numpy(), channel_first=True, softmax=True, device="cpu"))
    assert curves.shape == (2, steps + 1)
    for b, c in enumerate(ours):
        assert max(c.deletion) - min(c.deletion) > 0.02
        np.testing.assert_allclose(c.deletion[1:], np.delete(curves[b], steps - 1), atol=1e-5, rtol=0)


# --- insertion: exact identities ----------------------------------------------------------------------------

def test_insertion_is_deletion_in_the_reversed_order_read_backwards():
    """With K dividing H*W and a tie-free map, restoring the first k*n pixels of the map's order into the
    substrate is substituting the first (K-k)*n pixels of the reversed order (the negated map): the same
    image. So insertion(map)[k] = deletion(-map)[K-k], and the random insertion is the deletion for the map
    that ranks the random order backwards."""
    model, x, maps, steps = random_cnn(1), images(seed=3), tie_free_maps(seed=5), 16
    targets = torch.tensor([4, 1, 0])
    explainee = Explainee(model, max_batch=32)
    for replacement in REPLACEMENTS:
        forward = perturbation_curves(explainee, x, maps, targets, steps=steps, replacement=replacement,
                                      seed=9)
        backward = perturbation_curves(explainee, x, -maps, targets, steps=steps, replacement=replacement)
        backwards_random = torch.empty(32 * 32)
        backwards_random[random_order(32 * 32, seed=9)] = torch.arange(32 * 32, dtype=torch.float32)
        by_random = perturbation_curves(explainee, x, backwards_random.view(1, 32, 32).expand(3, -1, -1),
                                        targets, steps=steps, replacement=replacement)
        for f, r, q in zip(forward, backward, by_random, strict=True):
            np.testing.assert_allclose(f.insertion, r.deletion[::-1], atol=1e-6, rtol=0)
            np.testing.assert_allclose(f.insertion_random, q.deletion[::-1], atol=1e-6, rtol=0)
            assert f.insertion_auc == pytest.approx(r.deletion_auc, abs=1e-6)


@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_every_curve_equals_the_naive_reference(replacement):
    """Each substrate, steps that do not divide H*W (the last step takes the remainder), a map with ties
    (raster order), and a normalised model: the batched, chunked curves equal one image at a time built by
    hand."""
    model, pixels, steps, seed = random_cnn(2), images(2, seed=11), 20, 3
    x = normalize(pixels)
    maps = (tie_free_maps(2, seed=12) * 8).floor() / 8  # 8 levels: hundreds of ties
    targets = torch.tensor([3, 1])
    ours = perturbation_curves(Explainee(model, normalize=normalize, max_batch=13), x, maps, targets,
                               steps=steps, replacement=replacement, seed=seed)
    base = substrate(Explainee(model, normalize=normalize), x, replacement)
    perm = random_order(32 * 32, seed).numpy()
    for b, c in enumerate(ours):
        target = int(targets[b])
        deletion, insertion = reference(model, x[b], maps[b], target, steps, base[b])
        deletion_random, insertion_random = reference(model, x[b], maps[b], target, steps, base[b], perm)
        for got, want in ((c.deletion, deletion), (c.insertion, insertion),
                          (c.deletion_random, deletion_random), (c.insertion_random, insertion_random)):
            assert len(got) == steps + 1
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# --- substrates ---------------------------------------------------------------------------------------------

def test_blur_kernel_is_rises_gkern():
    """RISE's evaluation.py: gkern(11, 5) = scipy's gaussian_filter of an 11 x 11 Dirac delta, sigma 5."""
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    k = np.asarray(rise_kernel())
    np.testing.assert_allclose(np.outer(k, k), gaussian_filter(delta, 5), atol=1e-15)
    assert k.sum() == pytest.approx(1.0)


def test_substrates_are_the_pixel_space_ones_through_normalize():
    """Blur and mean commute with a per-channel affine normalisation: the substrate computed on the model's
    input is normalize(the pixel-space substrate); black is normalize(0); a flat image blurs to itself."""
    pixels = images(2, seed=13).double()
    explainee = Explainee(nn.Identity(), normalize=normalize)
    x = normalize(pixels)
    torch.testing.assert_close(substrate(explainee, x, "blur"), normalize(blur(pixels)))
    torch.testing.assert_close(substrate(explainee, x, "mean"),
                               normalize(pixels.mean((2, 3), keepdim=True).expand_as(pixels)))
    torch.testing.assert_close(substrate(explainee, x, "black"), normalize(torch.zeros_like(pixels)))
    flat = torch.full((1, 3, 9, 7), 0.3, dtype=torch.float64)
    torch.testing.assert_close(blur(flat), flat)


# --- the planted model --------------------------------------------------------------------------------------

class PatchNet(nn.Module):
    """Two classes; class 1's logit is a linear function of the mean of one 16 x 16 patch, nothing else."""

    top, left, size = 8, 12, 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = x[:, :, self.top:self.top + self.size, self.left:self.left + self.size].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(patch), 6.0 * (patch - 0.25)], 1)


def test_the_true_map_of_a_planted_model_scores_best():
    model, x, steps = PatchNet().eval(), images(3, seed=21), 16
    targets = torch.ones(3, dtype=torch.long)
    true = torch.zeros(3, 32, 32)
    true[:, 8:24, 12:28] = 1.0
    noise = torch.rand((3, 32, 32), generator=torch.Generator().manual_seed(22))
    maps = {"true": true, "inverted": 1.0 - true, "random": noise}
    explainee = Explainee(model)
    found = {name: perturbation_curves(explainee, x, m, targets, steps=steps, replacement="black")
             for name, m in maps.items()}
    # The random order's AUCs over 16 seeds: their spread is what "scores like the random order" means. A
    # random map orders the pixels uniformly at random with respect to the patch, as the random order does:
    # its AUC is one more draw from that distribution, so it lies within 4 of its standard deviations (a
    # chance below 1e-4 for a normal draw; ~0.012 here, against the true map's ~0.24 below it).
    spread = [perturbation_curves(explainee, x, true, targets, steps=steps, replacement="black", seed=s)
              for s in range(16)]
    for b in range(3):
        t, i, r = found["true"][b], found["inverted"][b], found["random"][b]
        assert t.deletion_auc < r.deletion_auc < i.deletion_auc
        assert t.insertion_auc > r.insertion_auc > i.insertion_auc
        # the patch's 256 pixels go in the first 4 steps (64 pixels a step): the curve falls, then stays
        assert t.deletion[3] > t.deletion[4] == pytest.approx(t.deletion[-1])
        assert t.insertion[3] < t.insertion[4] == pytest.approx(t.insertion[-1])
        for name in ("deletion", "insertion"):
            aucs = np.array([getattr(s[b], f"{name}_auc_random") for s in spread])
            assert aucs.std() < 0.05  # the random baseline is sharp enough to tell the maps apart
            assert abs(getattr(r, f"{name}_auc") - aucs.mean()) < 4 * aucs.std() + 1e-3
            assert getattr(t, f"{name}_auc") < aucs.min() if name == "deletion" \
                else getattr(t, f"{name}_auc") > aucs.max()
            assert abs(getattr(t, f"{name}_auc") - aucs.mean()) > 10 * aucs.std()


# --- limits -------------------------------------------------------------------------------------------------

def test_one_pixel_a_step_and_the_end_points():
    model, x = random_cnn(4), images(2, size=4, seed=31)
    maps = tie_free_maps(2, size=4, seed=32)
    targets = torch.tensor([0, 2])
    base = substrate(Explainee(model), x, "mean")
    ours = perturbation_curves(Explainee(model), x, maps, targets, steps=16, replacement="mean")
    for b, c in enumerate(ours):
        deletion, insertion = reference(model, x[b], maps[b], int(targets[b]), 16, base[b])
        np.testing.assert_allclose(c.deletion, deletion, atol=1e-6, rtol=0)
        np.testing.assert_allclose(c.insertion, insertion, atol=1e-6, rtol=0)
        untouched = probability(model, x[b], int(targets[b]))
        substituted = probability(model, base[b], int(targets[b]))
        for curve in (c.deletion, c.deletion_random):
            assert len(curve) == 17
            assert curve[0] == pytest.approx(untouched, abs=1e-6)
            assert curve[-1] == pytest.approx(substituted, abs=1e-6)
        for curve in (c.insertion, c.insertion_random):
            assert curve[0] == pytest.approx(substituted, abs=1e-6)
            assert curve[-1] == pytest.approx(untouched, abs=1e-6)


def test_given_clean_probabilities_are_the_untouched_points():
    model, x, maps = random_cnn(), images(2, size=8), tie_free_maps(2, size=8)
    clean = [0.123, 0.456]
    for c, p in zip(perturbation_curves(Explainee(model), x, maps, torch.tensor([1, 1]), steps=4,
                                        clean_probabilities=torch.tensor(clean)), clean, strict=True):
        assert c.deletion[0] == c.deletion_random[0] == c.insertion[-1] == c.insertion_random[-1]
        assert c.deletion[0] == pytest.approx(p, abs=1e-7)  # float32 in, float out


def test_forwards_are_counted_and_chunked():
    assert forwards_per_image(20) == 77
    assert forwards_per_image(2) == 5
    net = Counting(random_cnn())
    x, maps, targets = images(3, size=8), tie_free_maps(3, size=8), torch.tensor([0, 1, 2])
    perturbation_curves(Explainee(net, max_batch=7), x, maps, targets, steps=5,
                        clean_probabilities=[0.5, 0.5, 0.5])
    assert sum(net.passes) == forwards_per_image(5) * 3 == 51
    assert net.passes == [7] * 7 + [2]  # even_chunk(51, 7) = 7: ceil(51 / 7) = 8 passes
    net.passes.clear()
    perturbation_curves(Explainee(net, max_batch=7), x, maps, targets, steps=5)
    assert sum(net.passes) == (forwards_per_image(5) + 1) * 3  # the untouched images' own passes
    assert max(net.passes) <= 7


def test_results_do_not_depend_on_the_batch():
    model, x, maps = random_cnn(6), images(3, seed=41), tie_free_maps(3, seed=42)
    targets = torch.tensor([4, 0, 2])
    together = perturbation_curves(Explainee(model, max_batch=9), x, maps, targets, steps=8,
                                   replacement="blur", seed=5)
    alone = perturbation_curves(Explainee(model, max_batch=50), x[1:2], maps[1:2], targets[1:2], steps=8,
                                replacement="blur", seed=5)[0]
    for name in ("deletion", "insertion", "deletion_random", "insertion_random"):
        np.testing.assert_allclose(getattr(together[1], name), getattr(alone, name), atol=1e-6, rtol=0)


def test_a_raising_checkpoint_stops_before_the_next_forward():
    net = Counting(random_cnn())
    calls = []

    class Cancelled(Exception):
        pass

    def checkpoint():
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        perturbation_curves(Explainee(net, max_batch=4), images(2, size=8), tie_free_maps(2, size=8),
                            torch.tensor([0, 1]), steps=6, checkpoint=checkpoint)
    assert len(net.passes) == 2


def test_curves_as_dict_and_the_trapezoid():
    c = Curves(deletion=[1.0, 0.5, 0.0], insertion=[0.0, 0.5, 1.0], deletion_random=[1.0, 1.0, 0.0],
               insertion_random=[0.0, 0.0, 1.0], steps=2, replacement="blur")
    d = c.as_dict()
    assert set(d) == {"deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random", "steps",
                      "replacement", "deletion_curve", "insertion_curve", "deletion_curve_random",
                      "insertion_curve_random"}
    assert (d["deletion_auc"], d["insertion_auc"], d["deletion_auc_random"], d["insertion_auc_random"]) == \
        (0.5, 0.5, 0.75, 0.25)
    assert d["deletion_curve_random"] == [1.0, 1.0, 0.0] and d["steps"] == 2 and d["replacement"] == "blur"
    curve = [0.9, 0.7, 0.4, 0.35, 0.1]
    assert trapezoid_auc(curve) == pytest.approx(np.trapezoid(curve, dx=1 / 4))


# --- bad arguments ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "named"), [
    ({"steps": 1}, "steps"),
    ({"steps": 17}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"replacement": "grey"}, "replacement"),
    ({"heatmaps": torch.rand(2, 4, 5)}, "heatmaps"),
    ({"targets": torch.tensor([0, 1, 2])}, "targets"),
    ({"targets": torch.tensor([0, -1])}, "targets"),
    ({"clean_probabilities": [0.5]}, "clean_probabilities"),
])
def test_bad_arguments_name_the_argument(change, named):
    args = {"heatmaps": torch.rand(2, 4, 4), "targets": torch.tensor([0, 1]), "steps": 4,
            "replacement": "blur"}
    args.update(change)
    with pytest.raises(ValueError, match=named):
        perturbation_curves(Explainee(random_cnn()), torch.rand(2, 3, 4, 4), **args)


def test_forwards_per_image_checks_steps():
    with pytest.raises(ValueError, match="steps"):
        forwards_per_image(1)
