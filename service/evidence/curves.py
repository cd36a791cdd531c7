"""Deletion and insertion curves of a saliency map (Petsiuk et al., RISE, BMVC 2018; methods-reference
section 8): how fast the explained class's probability falls as the map's most salient pixels are replaced
by a substrate (deletion), and how fast it rises as they are restored into the substrate (insertion), each
beside the same game played in a random order of the same pixels (the baseline a reader needs).

The game, per image b of x (B, C, H, W), in the space the Explainee's module takes (model-input space, as
`Method.attribute` receives it):
- Order: the H*W pixels by decreasing heatmaps[b]; ties keep raster order (row-major, the lower flat index
  first: a stable sort, numpy's `np.argsort(-map, kind="stable")`). The random order is
  `torch.randperm(H*W, generator=torch.Generator().manual_seed(seed))` (a CPU generator of its own per image,
  so an image's order depends on `seed` and its size only, never on its place in a batch or the device), used
  by both random curves.
- Steps: K = `steps` steps of n = H*W // K pixels each, the last step taking the remainder; after step k the
  first c_k = k*n pixels of the order (c_K = H*W) are replaced (deletion) or restored (insertion), all
  channels of a pixel together.
- Points: K + 1 per curve, x = k / K from 0 to 1; deletion starts at the untouched image and ends at the fully
  substituted one, insertion the reverse. The y value is softmax(logits)[targets[b]] of the perturbed image.
- AUC: the trapezoid rule over x in [0, 1], (sum - first/2 - last/2) / K (RISE's `auc`).

Cost: the untouched image's probability comes from the clean logits (the method's own forward) and the fully
substituted image is the same for every order, so one image costs 4 (K - 1) + 1 forward passes
(`forwards_per_image`), no backward; one more when the caller has no clean probabilities.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from ..methods.base import Explainee
from ..methods.passes import Checkpoint, even_chunk, no_checkpoint

# The substrate perturbed pixels take:
# - "blur": the image blurred by RISE's kernel (`evaluation.py` `gkern(11, 5)`: scipy's gaussian_filter,
#   sigma 5, applied to an 11 x 11 Dirac delta, so a Gaussian with its tails folded back in, summing to 1),
#   with replicated borders (RISE pads with zeros, which darkens the borders);
# - "black": pixel value 0 in every channel (`Explainee.normalize` of zeros in model-input space);
# - "mean": the image's own per-channel mean.
# Blur and mean are computed in model-input space. Both are affine-invariant (a kernel summing to 1 with
# replicated borders; a mean), so for a per-channel affine `normalize` (service/zoo's (p - mean) / std) they
# equal the pixel-space substrate mapped by `normalize`: the blur is the one of the pixels, as RISE specifies.
REPLACEMENTS = ("blur", "black", "mean")

BLUR_SIZE = 11
BLUR_SIGMA = 5.0


def forwards_per_image(steps: int) -> int:
    """The forward passes (no backward) one image's curves cost at `steps` steps: deletion and insertion, in
    the map's order and in a random one, K + 1 points each, less the shared end points (the untouched image:
    from the clean logits; the fully substituted image: one pass for all four curves): 4 (K - 1) + 1.

    `perturbation_curves` makes exactly that many per image, plus one when `clean_probabilities` is None (the
    untouched image's own pass)."""
    _check_steps(steps)
    return 4 * (steps - 1) + 1


def trapezoid_auc(curve: Sequence[float]) -> float:
    """Area under K + 1 points spaced evenly over x in [0, 1]: (sum - first/2 - last/2) / K."""
    k = len(curve) - 1
    if k < 1:
        raise ValueError("a curve needs at least 2 points")
    return (math.fsum(curve) - curve[0] / 2 - curve[-1] / 2) / k


@dataclass(frozen=True)
class Curves:
    """One image's curves: K + 1 probabilities each, x = k / K from 0 to 1. Lower deletion AUC and higher
    insertion AUC than the random order's: the map ranks the pixels the model uses first."""

    deletion: list[float]
    insertion: list[float]
    deletion_random: list[float]
    insertion_random: list[float]
    steps: int
    replacement: str

    @property
    def deletion_auc(self) -> float:
        return trapezoid_auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return trapezoid_auc(self.insertion)

    @property
    def deletion_auc_random(self) -> float:
        return trapezoid_auc(self.deletion_random)

    @property
    def insertion_auc_random(self) -> float:
        return trapezoid_auc(self.insertion_random)

    def as_dict(self) -> dict[str, Any]:
        return {
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
            "deletion_auc_random": self.deletion_auc_random,
            "insertion_auc_random": self.insertion_auc_random,
            "steps": self.steps,
            "replacement": self.replacement,
            "deletion_curve": list(self.deletion),
            "insertion_curve": list(self.insertion),
            "deletion_curve_random": list(self.deletion_random),
            "insertion_curve_random": list(self.insertion_random),
        }


@lru_cache(maxsize=4)
def rise_kernel(size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> tuple[float, ...]:
    """The 1-D factor of RISE's blur kernel: scipy.ndimage.gaussian_filter1d (truncate 4, mode "reflect")
    of a length-`size` Dirac delta at the centre. Its outer product with itself is `gkern(size, sigma)`'s
    2-D kernel (the filter is separable); it sums to 1."""
    radius = int(4.0 * sigma + 0.5)
    weights = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-radius, radius + 1)]
    total = math.fsum(weights)
    centre = size // 2

    def reflect(m: int) -> int:  # scipy's "reflect": (d c b a | a b c d | d c b a)
        r = m % (2 * size)
        return r if r < size else 2 * size - 1 - r

    return tuple(math.fsum(w for t, w in zip(range(-radius, radius + 1), weights, strict=True)
                           if reflect(i + t) == centre) / total for i in range(size))


def blur(x: torch.Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """x (B, C, H, W) blurred channel by channel by RISE's kernel, borders replicated."""
    channels = x.shape[1]
    k = torch.tensor(rise_kernel(size, sigma), dtype=x.dtype, device=x.device)
    pad = size // 2
    out = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return F.conv2d(out, k.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)


def substrate(explainee: Explainee, x: torch.Tensor, replacement: str) -> torch.Tensor:
    """(B, C, H, W): what every pixel of x is replaced by when the whole image is substituted."""
    _check_replacement(replacement)
    if replacement == "blur":
        return blur(x)
    if replacement == "black":
        return explainee.normalize(torch.zeros_like(x))
    return x.mean((2, 3), keepdim=True).expand_as(x).clone()


def pixel_ranks(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int32: each pixel's place in its map's order (0 first: the most salient; ties in raster
    order)."""
    flat = heatmaps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    return _ranks_of(order).view_as(heatmaps)


def random_order(pixels: int, seed: int) -> torch.Tensor:
    """The random order of an image's pixels (flat indices, on the CPU): the same for every image of `pixels`
    pixels, whatever the batch."""
    return torch.randperm(pixels, generator=torch.Generator().manual_seed(seed))


def perturbation_curves(explainee: Explainee, x: torch.Tensor, heatmaps: torch.Tensor, targets: torch.Tensor,
                        *, steps: int = 20, replacement: str = "blur", seed: int = 0,
                        checkpoint: Checkpoint = no_checkpoint,
                        clean_probabilities: torch.Tensor | Sequence[float] | None = None) -> list[Curves]:
    """Deletion and insertion curves of each image's map, in the map's order and in a random one.

    x: (B, C, H, W) in the space `explainee.module` takes; heatmaps: (B, H, W), any real values, larger = more
    salient; targets: (B,) the explained classes (resolved: no -1). clean_probabilities: (B,) softmax
    probabilities of the targets in the untouched images (from the method's forward); None: computed here, one
    pass more per image. Forward passes only, under torch.no_grad, all images' perturbed copies in passes of
    at most `explainee.max_batch` (even sizes), built pass by pass; `checkpoint()` before each pass (raise to
    stop). The forward runs in whatever precision scope the caller holds.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    batch, _, height, width = x.shape
    pixels = height * width
    if heatmaps.shape != (batch, height, width):
        raise ValueError(f"heatmaps must be (B, H, W) = {(batch, height, width)} like x, got "
                         f"{tuple(heatmaps.shape)}")
    if targets.shape != (batch,):
        raise ValueError(f"targets must be ({batch},), one class per image, got {tuple(targets.shape)}")
    if bool((targets < 0).any()):
        raise ValueError("targets must be resolved class indices (no -1)")
    _check_steps(steps, pixels)
    _check_replacement(replacement)
    clean: list[float] | None = None
    if clean_probabilities is not None:
        given = clean_probabilities
        clean = [float(p) for p in (given.tolist() if isinstance(given, torch.Tensor) else given)]
        if len(clean) != batch:
            raise ValueError(f"clean_probabilities must hold {batch} values, one per image, got {len(clean)}")
    if batch == 0:
        return []

    device = x.device
    base = substrate(explainee, x, replacement)
    ranks = torch.stack([pixel_ranks(heatmaps.to(device)).flatten(1),
                         _ranks_of(random_order(pixels, seed).to(device)[None]).expand(batch, -1)], dim=1)
    ranks = ranks.view(batch, 2, height, width)
    targets = targets.to(device)

    # One image's passes, as (order, insertion, pixels substituted or restored): deletion replaces the
    # pixels ranked below the count, insertion restores them.
    per_step = pixels // steps
    counts = [k * per_step for k in range(1, steps)]
    plan = [(0, False, 0)] if clean is None else []  # the untouched image
    plan.append((0, False, pixels))  # the fully substituted image, the same for every order
    for order in (0, 1):
        plan += [(order, False, c) for c in counts] + [(order, True, c) for c in counts]
    per_image = len(plan)
    item_order = torch.tensor([p[0] for p in plan], device=device).repeat(batch)
    item_insert = torch.tensor([p[1] for p in plan], device=device).repeat(batch)
    item_count = torch.tensor([p[2] for p in plan], dtype=torch.int32, device=device).repeat(batch)
    item_image = torch.arange(batch, device=device).repeat_interleave(per_image)

    total = batch * per_image
    chunk = even_chunk(total, explainee.max_batch)
    found = []
    with torch.no_grad():
        for start in range(0, total, chunk):
            checkpoint()  # before the pass's copies are even built
            rows = slice(start, min(start + chunk, total))
            image = item_image[rows]
            replaced = (ranks[image, item_order[rows]] < item_count[rows].view(-1, 1, 1)) \
                != item_insert[rows].view(-1, 1, 1)
            copies = torch.where(replaced[:, None], base[image], x[image])
            del replaced
            logits = explainee.module(copies)
            del copies
            found.append(logits.float().softmax(1).gather(1, targets[image].view(-1, 1)).squeeze(1))
    probabilities = torch.cat(found).view(batch, per_image).tolist()

    out = []
    first = 1 if clean is None else 0  # the fully substituted image's pass (after the untouched one's)
    for b, row in enumerate(probabilities):
        untouched = row[0] if clean is None else clean[b]
        substituted = row[first]
        curves: list[list[float]] = []
        at = first + 1
        for _ in (0, 1):
            deleted, inserted = row[at:at + steps - 1], row[at + steps - 1:at + 2 * (steps - 1)]
            at += 2 * (steps - 1)
            curves += [[untouched, *deleted, substituted], [substituted, *inserted, untouched]]
        out.append(Curves(deletion=curves[0], insertion=curves[1], deletion_random=curves[2],
                          insertion_random=curves[3], steps=steps, replacement=replacement))
    return out


def _ranks_of(order: torch.Tensor) -> torch.Tensor:
    """(B, N) orders (flat pixel indices, first = most salient) -> (B, N) int32 ranks."""
    ranks = torch.empty(order.shape, dtype=torch.int32, device=order.device)
    positions = torch.arange(order.shape[1], dtype=torch.int32, device=order.device)
    return ranks.scatter_(1, order, positions.expand_as(order).contiguous())


def _check_steps(steps: int, pixels: int | None = None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer of at least 2, got {steps!r}")
    if pixels is not None and steps > pixels:
        raise ValueError(f"steps must be at most the pixels of an image (H*W = {pixels}), got {steps}")


def _check_replacement(replacement: str) -> None:
    if replacement not in REPLACEMENTS:
        raise ValueError(f"replacement must be one of {', '.join(REPLACEMENTS)}; got {replacement!r}")
