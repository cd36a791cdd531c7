"""D-RISE (Petsiuk et al., CVPR 2021): a black-box saliency map per detection, from random masks.

For each of N smooth random masks M_i the detector sees the image times M_i. A target detection d_t scores
the mask by how well the masked image still finds it: w_i = max_j IoU(L_t, L_j) x cos(P_t, P_j) x O_j over
the masked image's detections d_j (0 when it has none). The saliency of d_t is sum_i w_i M_i. All targets
of an image share the N forwards; the forwards run `chunk` masked images at a time, so memory follows
`chunk`, never N.

Masks (RISE's): a binary s x s grid, each cell kept with probability p, upsampled bilinearly
(align_corners=False) to (s + 1) x cell, cell = (ceil(H/s), ceil(W/s)), and cropped to H x W at a random
shift in [0, cell) (computed as two small matrix products per mask, `MaskSampler.masks`). RISE's code resizes
with skimage (`mode="reflect"`); torch's interpolate clamps at the border instead, which only changes the
outermost half cell of the upsampled grid, mostly cropped away.

Reproducibility: mask i depends on (seed, i) only. The grids and shifts are drawn in fixed blocks of
`BLOCK` masks, block b from its own generator seeded by (seed, b), and upsampled per chunk. So a chunk
size, the images batched beside this one, the device, or a larger N (its first masks are the smaller N's)
never change a mask. BLOCK is part of that contract: changing it changes every seed's masks.

The displayed map is centred before its min-max: sum_i (w_i - mean w) M_i = raw - mean(w) * sum_i M_i. A
weight that does not depend on the mask (a detection the masks never disturb) then gives a flat map rather
than the masks' own coverage pattern min-maxed into false structure, and the coverage noise every raw map
carries cancels (Microsoft's vision-explanation-methods centres the same way). The raw sum (the paper's
formula), the coverage sum_i M_i and the weight sums come back too (`info`), from which any other
normalisation follows.

Early stop (off by default): the masks alternate between two halves (even and odd index), each with its own
accumulator (their sum is the map). Every `EarlyStop.every` masks each target's two half maps are
correlated (Pearson, r); if the halves are noise-independent estimates of one map, the full map's
correlation with the converged one is sqrt(2r / (1 + r)) (split-half reliability). When that estimate
reaches `EarlyStop.corr` for every target of an image, the image stops and reports the masks it used. The
halves are returned anyway (`info["halves"]`): how much the map still owes to its draws.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import Cancelled, InvalidInput
from .base import DetectFn, Detections

# The bounds the API validates too (service/detection/params.py): the paper used N = 5000, s = 16, p = 0.5.
MIN_MASKS, MAX_MASKS = 16, 10_000
MIN_GRID, MAX_GRID = 2, 64
# 1000 masks, not the paper's 5000: the map's correlation with a high-N reference against the cost is
# measured in docs/benchmarks.md ("D-RISE against vision-explanation-methods (CPU)").
DEFAULT_MASKS = 1000
DEFAULT_GRID = 16
DEFAULT_KEEP = 0.5
DEFAULT_CHUNK = 32  # masked images per detector call: the pass budget, when the caller has none
BLOCK = 256  # masks drawn per generator (see the module's docstring: part of what a seed means)
_EPS = 1e-12
_MASK64 = 2**64 - 1
FLAT_SPREAD = 1e-5  # a target whose weights spread less than this (relative) gets a flat (zero) map

Progress = Callable[[int, int], None]  # (masks done, masks in all) after each detector call
ShouldStop = Callable[[], bool]  # True: the work is cancelled (raises service.errors.Cancelled)


@dataclass(frozen=True)
class DriseSettings:
    """One D-RISE call's masks: how many, how coarse, how dense, which draw. Raises InvalidInput (a
    ValueError: 422 at the API) when out of range."""

    n_masks: int = DEFAULT_MASKS
    grid: int = DEFAULT_GRID
    p: float = DEFAULT_KEEP
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n_masks, int) or not MIN_MASKS <= self.n_masks <= MAX_MASKS:
            raise InvalidInput(f"n_masks must be an integer in [{MIN_MASKS}, {MAX_MASKS}], "
                               f"got {self.n_masks!r}")
        if not isinstance(self.grid, int) or not MIN_GRID <= self.grid <= MAX_GRID:
            raise InvalidInput(f"grid must be an integer in [{MIN_GRID}, {MAX_GRID}], got {self.grid!r}")
        if not (isinstance(self.p, (int, float)) and 0.0 < self.p < 1.0):
            raise InvalidInput(f"p (the keep probability) must be in (0, 1), got {self.p!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise InvalidInput(f"seed must be an integer in [0, 2**31), got {self.seed!r}")


@dataclass(frozen=True)
class EarlyStop:
    """Stop an image once every target's map is estimated to correlate at least `corr` with the map of
    unlimited masks (split-half reliability, see the module's docstring), checked every `every` masks."""

    corr: float = 0.98
    every: int = 100

    def __post_init__(self) -> None:
        if not 0.0 < self.corr < 1.0:
            raise InvalidInput(f"early stop corr must be in (0, 1), got {self.corr!r}")
        if self.every < 2:
            raise InvalidInput(f"early stop every must be at least 2 masks, got {self.every!r}")


class MaskSampler:
    """The masks of one image size and seed: `masks(start, stop)` gives masks start..stop-1 (stop - start,
    H, W) float32 on `device`, the same whatever range they are asked in."""

    def __init__(self, size: tuple[int, int], settings: DriseSettings, device: torch.device | str = "cpu"):
        self.height, self.width = size
        if self.height < 1 or self.width < 1:
            raise InvalidInput(f"image size must be positive, got {size}")
        self.settings, self.device = settings, torch.device(device)
        s = settings.grid
        self.cell = (math.ceil(self.height / s), math.ceil(self.width / s))
        self.up = ((s + 1) * self.cell[0], (s + 1) * self.cell[1])
        self._block: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def _draw_block(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block b's grids (BLOCK, s, s) bool and shifts (BLOCK,), (BLOCK,), on the CPU (its generator's
        stream is the same on every machine)."""
        if self._block is not None and self._block[0] == b:
            return self._block[1:]
        s = self.settings
        g = torch.Generator().manual_seed(_block_seed(s.seed, b))
        grids = torch.rand(BLOCK, s.grid, s.grid, generator=g) < s.p
        dy = torch.randint(0, self.cell[0], (BLOCK,), generator=g)
        dx = torch.randint(0, self.cell[1], (BLOCK,), generator=g)
        self._block = (b, grids, dy, dx)
        return grids, dy, dx

    def grids(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks start..stop-1 before upsampling: grids (n, s, s) bool, row and column shifts (n,) each."""
        parts = []
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            lo, hi = max(start, b * BLOCK) - b * BLOCK, min(stop, (b + 1) * BLOCK) - b * BLOCK
            grids, dy, dx = self._draw_block(b)
            parts.append((grids[lo:hi], dy[lo:hi], dx[lo:hi]))
        if len(parts) == 1:
            return parts[0]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts]))

    def masks(self, start: int, stop: int) -> torch.Tensor:
        """Bilinear upsampling is separable: the upsampled grid is R @ G @ C^T, R (up_h, s) and C (up_w, s)
        the interpolation weights of rows and columns, and its crop at (dy, dx) keeps rows dy..dy+H-1 of R
        and columns dx..dx+W-1 of C. So each mask is two small matrix products, with no (s+1)-cell upsampled
        copy to crop from: the same values as F.interpolate then slicing (to float rounding, tested), at a
        third of the cost."""
        grids, dy, dx = self.grids(start, stop)
        if self._weights is None:
            self._weights = (_interpolation(self.up[0], self.settings.grid).to(self.device),
                             _interpolation(self.up[1], self.settings.grid).to(self.device))
        rows_of, cols_of = self._weights
        dy, dx = dy.to(self.device), dx.to(self.device)
        rows = rows_of[dy[:, None] + torch.arange(self.height, device=self.device)]  # (n, H, s)
        cols = cols_of[dx[:, None] + torch.arange(self.width, device=self.device)]  # (n, W, s)
        return torch.bmm(torch.bmm(rows, grids.to(self.device, torch.float32)), cols.transpose(1, 2))


def _interpolation(out_len: int, in_len: int) -> torch.Tensor:
    """(out_len, in_len): the weights of torch's bilinear interpolate along one axis (align_corners=False):
    output pixel u samples the input at (u + 0.5) * in/out - 0.5, clamped at 0, between its two neighbours
    (the last one repeated at the far border)."""
    u = torch.arange(out_len, dtype=torch.float64)
    src = ((u + 0.5) * (in_len / out_len) - 0.5).clamp_min(0)
    low = src.floor().long().clamp_max(in_len - 1)
    high = (low + 1).clamp_max(in_len - 1)
    frac = src - low
    weights = torch.zeros(out_len, in_len, dtype=torch.float64)
    weights.index_put_((torch.arange(out_len), low), 1 - frac, accumulate=True)
    weights.index_put_((torch.arange(out_len), high), frac, accumulate=True)
    return weights.float()


def _block_seed(seed: int, block: int) -> int:
    """A well-mixed seed for (seed, block) (splitmix64's finaliser): torch's CPU generator keeps only the
    low 32 bits of a seed, so (seed << 32) | block would give every seed the same masks."""
    z = ((seed << 32) + block + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(K, 4), (M, 4) xyxy -> (K, M). A degenerate pair (zero union) has IoU 0, not NaN."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(_EPS), torch.zeros_like(inter))


def similarity(targets: Detections, found: Detections, num_classes: int) -> torch.Tensor:
    """(K, M): s(d_t, d_j) = IoU(L_t, L_j) x cos(P_t, P_j) x O_j. P: `probs` or one-hot labels; O:
    `objectness` or the score."""
    device = targets.boxes.device
    boxes = found.boxes.to(device, torch.float32)
    p_t = F.normalize(targets.class_vectors(num_classes).to(device, torch.float32), dim=1, eps=_EPS)
    p_j = F.normalize(found.class_vectors(num_classes).to(device, torch.float32), dim=1, eps=_EPS)
    if p_t.shape[1] != p_j.shape[1]:
        raise ValueError(f"class vectors differ in length: targets {p_t.shape[1]}, detections {p_j.shape[1]}")
    objectness = found.objectness_or_score().to(device, torch.float32)
    return box_iou(targets.boxes.to(torch.float32), boxes) * (p_t @ p_j.T) * objectness[None, :]


def mask_weights(targets: Detections, masked: Sequence[Detections], num_classes: int) -> torch.Tensor:
    """(K, n): each target's weight for each masked image, max_j s(d_t, d_j) (0 where the masked image has
    no detections). One similarity matrix over all the masked images' detections at once."""
    device = targets.boxes.device
    if not masked or len(targets) == 0:
        return torch.zeros(len(targets), len(masked), device=device)
    counts = torch.tensor([len(d) for d in masked], device=device)
    found = Detections(
        boxes=torch.cat([d.boxes.to(device) for d in masked]).reshape(-1, 4),
        labels=torch.cat([d.labels.to(device) for d in masked]),
        scores=torch.cat([d.objectness_or_score().to(device) for d in masked]),
        probs=torch.cat([d.class_vectors(num_classes).to(device) for d in masked]),
    )
    scores = similarity(targets, found, num_classes)  # (K, M)
    owner = torch.repeat_interleave(torch.arange(len(masked), device=device), counts)
    weights = torch.zeros(len(targets), len(masked), device=device)
    # the similarities are >= 0 (IoU, probabilities, objectness), so starting from 0 gives max_j, and 0 for
    # a masked image with no detection
    return weights.scatter_reduce_(1, owner.expand(len(targets), -1), scores, "amax", include_self=True)


class _Image:
    """One image's running sums, per half (even and odd mask index)."""

    def __init__(self, image: torch.Tensor, targets: Detections):
        k, (h, w) = len(targets), image.shape[-2:]
        self.image, self.targets = image, targets
        self.acc = torch.zeros(2, k, h * w, device=image.device)  # sum w_i M_i
        self.coverage = torch.zeros(2, h * w, device=image.device)  # sum M_i
        self.weight_sum = torch.zeros(2, k, device=image.device)
        self.count = [0, 0]
        self.weight_min = torch.full((k,), math.inf, device=image.device)
        self.weight_max = torch.full((k,), -math.inf, device=image.device)
        self.done = 0
        self.stopped_early = False
        self.reliability: float | None = None

    def add(self, start: int, masks: torch.Tensor, weights: torch.Tensor) -> None:
        """masks (n, H, W) of indices start.., weights (K, n)."""
        n = masks.shape[0]
        flat = masks.reshape(n, -1)
        # (2, n): which half each mask falls in; one matmul per sum, no copy of the masks per half
        odd = (torch.arange(start, start + n, device=flat.device) % 2).to(flat.dtype)
        halves = torch.stack([1 - odd, odd])
        split = (halves[:, None, :] * weights[None]).reshape(-1, n)  # (2K, n)
        sums = torch.cat([split, halves]) @ flat  # one pass over the masks for both sums
        self.acc += sums[:-2].view_as(self.acc)
        self.coverage += sums[-2:]
        self.weight_sum += split.sum(1).view_as(self.weight_sum)
        odd_count = (start + n) // 2 - start // 2  # odd indices in [start, start + n)
        self.count[1] += odd_count
        self.count[0] += n - odd_count
        if weights.numel():
            self.weight_min = torch.minimum(self.weight_min, weights.amin(1))
            self.weight_max = torch.maximum(self.weight_max, weights.amax(1))
        self.done = start + n

    def centred(self, half: int | None = None) -> torch.Tensor:
        """(K, H*W): sum (w_i - mean w) M_i over one half's masks, or all."""
        if half is None:
            acc, coverage = self.acc.sum(0), self.coverage.sum(0)
            wsum, count = self.weight_sum.sum(0), self.done
        else:
            acc, coverage, wsum, count = (self.acc[half], self.coverage[half], self.weight_sum[half],
                                          self.count[half])
        return acc - (wsum / max(count, 1))[:, None] * coverage[None, :]

    def converged(self, corr: float) -> bool:
        """Every target's estimated correlation with its converged map >= corr (split-half reliability)."""
        if len(self.targets) == 0:
            return True
        r = _row_corr(self.centred(0), self.centred(1), self._flat())
        estimate = torch.sqrt((2 * r / (1 + r)).clamp_min(0))
        self.reliability = float(estimate.min())
        return self.reliability >= corr

    def _flat(self) -> torch.Tensor:
        """(K,) bool: the target's weight never changed (beyond rounding: a relative 1e-5, about what a
        detector's batch-size-dependent kernels move a score), so its map is flat in theory and only rounding
        is left in it, which a min-max would blow up to [0, 1]."""
        return self.weight_max - self.weight_min <= FLAT_SPREAD * self.weight_max.abs()

    def result(self, n_requested: int) -> tuple[torch.Tensor, dict[str, Any]]:
        h, w = self.image.shape[-2:]
        k = len(self.targets)
        flat = self._flat()[:, None]
        shape = (k, h, w)
        maps = _minmax(self.centred(), flat).reshape(shape)
        halves = tuple(_minmax(self.centred(h), flat).reshape(shape) for h in (0, 1))
        info = {
            "n_masks": self.done,  # the masks used (fewer than requested when stopped early)
            "n_requested": n_requested,
            "stopped_early": self.stopped_early,
            "reliability": self.reliability,  # last split-half estimate (early stop only), else None
            "raw": self.acc.sum(0).reshape(shape),  # sum_i w_i M_i, the paper's map
            "coverage": self.coverage.sum(0).reshape(h, w),  # sum_i M_i
            "weight_sum": self.weight_sum.sum(0),  # (K,) sum_i w_i
            "halves": halves,  # the displayed maps of the even and of the odd masks alone
        }
        return maps, info


def _minmax(maps: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Per-row min-max to [0, 1]; rows whose weight never varied (exactly flat in theory, float noise in
    practice) become zeros."""
    low, high = maps.amin(1, keepdim=True), maps.amax(1, keepdim=True)
    scaled = (maps - low) / (high - low).clamp_min(_EPS)
    return torch.where(flat, torch.zeros_like(scaled), scaled)


def _row_corr(a: torch.Tensor, b: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b; 1 for a flat target (both halves are
    the same constant), 0 where only one half is constant."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denom = (a.norm(dim=1) * b.norm(dim=1))
    r = torch.where(denom > 0, (a * b).sum(1) / denom.clamp_min(_EPS), torch.zeros_like(denom))
    return torch.where(flat, torch.ones_like(r), r)


def drise_batch(detect: DetectFn, images: torch.Tensor, targets: Sequence[Detections], num_classes: int,
                settings: DriseSettings = DriseSettings(), *, chunk: int = DEFAULT_CHUNK,
                early_stop: EarlyStop | None = None, on_progress: Progress | None = None,
                should_stop: ShouldStop | None = None) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """D-RISE for a batch of images of one size (B, 3, H, W) in [0, 1], targets[b] the detections of image
    b to explain. Per image: (maps (K_b, H, W) in [0, 1], info) (see `drise`).

    Every image gets the same masks (mask i depends on (seed, i) only, so a map never depends on the images
    batched beside it); each detector call carries at most `chunk` masked images, `chunk // B` masks of
    each image still running. `on_progress(done, total)` after each call (masks, summed over the images);
    `should_stop()` before each call: True raises service.errors.Cancelled (nothing is returned).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise InvalidInput(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if len(targets) != images.shape[0]:
        raise InvalidInput(f"{images.shape[0]} images but {len(targets)} target sets")
    if not isinstance(chunk, int) or chunk < 1:
        raise InvalidInput(f"chunk must be a positive integer, got {chunk!r}")
    if num_classes < 1:
        raise InvalidInput(f"num_classes must be positive, got {num_classes!r}")
    n = settings.n_masks
    sampler = MaskSampler((images.shape[2], images.shape[3]), settings, images.device)
    runs = [_Image(image, t) for image, t in zip(images, targets, strict=True)]
    # an image with nothing to explain costs no forward
    active = [r for r in runs if len(r.targets)]
    total, done = n * len(active), 0
    # The masked copies of every call go to one buffer: a fresh (chunk, 3, H, W) tensor per call costs its
    # page faults again each time on the CPU, about as much as writing it. So `detect` must not keep its
    # input past the call (it gets a view that the next call overwrites).
    buffer = torch.empty(min(chunk, n * len(active)), *images.shape[1:], dtype=images.dtype,
                         device=images.device)
    start = 0
    while active and start < n:
        if should_stop is not None and should_stop():
            raise Cancelled("D-RISE was cancelled")
        stop = min(n, start + max(1, chunk // len(active)))
        if early_stop is not None:  # end the step on a checkpoint, so where it stops never depends on chunk
            stop = min(stop, (start // early_stop.every + 1) * early_stop.every)
        masks = sampler.masks(start, stop)
        m = stop - start
        per_call = max(1, chunk // m)  # images per call: more images than `chunk` take several calls
        for first in range(0, len(active), per_call):
            if first and should_stop is not None and should_stop():
                raise Cancelled("D-RISE was cancelled")
            group = active[first:first + per_call]
            like = masks[:, None].to(images.dtype)
            masked = buffer[:len(group) * m]
            for i, run in enumerate(group):
                torch.mul(run.image[None], like, out=masked[i * m:(i + 1) * m])
            found = detect(masked)
            if len(found) != masked.shape[0]:
                raise RuntimeError(f"the detector returned {len(found)} results for {masked.shape[0]} images")
            for i, run in enumerate(group):
                weights = mask_weights(run.targets, found[i * m:(i + 1) * m], num_classes)
                run.add(start, masks, weights.to(masks.device))
        done += m * len(active)
        start = stop
        if early_stop is not None and start % early_stop.every == 0 and start < n:
            for run in active:
                if run.converged(early_stop.corr):
                    run.stopped_early = True
                    total -= n - start  # the masks it no longer needs
            active = [r for r in active if not r.stopped_early]
        if on_progress is not None:
            on_progress(done, total)
    return [run.result(n) for run in runs]


def drise(detect: DetectFn, image: torch.Tensor, targets: Detections, num_classes: int,
          settings: DriseSettings = DriseSettings(), *, chunk: int = DEFAULT_CHUNK,
          early_stop: EarlyStop | None = None, on_progress: Progress | None = None,
          should_stop: ShouldStop | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """D-RISE maps of one image (3, H, W) in [0, 1]: (maps (K, H, W) in [0, 1], one per target, info).

    `detect` gets (<= chunk, 3, H, W) masked copies per call, a buffer the next call overwrites (it must
    not keep it). Zero targets: (0, H, W) maps and no forward.
    info: n_masks (used), n_requested, stopped_early, reliability (the last split-half estimate, with early
    stop), raw (K, H, W) = sum_i w_i M_i, coverage (H, W) = sum_i M_i, weight_sum (K,), halves (the maps of
    the even and of the odd masks, (K, H, W) each).
    """
    if image.dim() != 3:
        raise InvalidInput(f"image must be (3, H, W), got {tuple(image.shape)}")
    return drise_batch(detect, image[None], [targets], num_classes, settings, chunk=chunk,
                       early_stop=early_stop, on_progress=on_progress, should_stop=should_stop)[0]
