"""Image -> model input: the whole image resized to the input size (no crop), RGB, normalised."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from ..imaging import REDUCING_GAP
from .cards import PreprocessSpec

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}

@dataclass(frozen=True)
class Preprocessor:
    spec: PreprocessSpec

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.spec.input_size

    @property
    def decode_side(self) -> int:
        """The shortest side an upload must keep when it is decoded at a reduced scale: what the resize's
        block reduction would keep anyway (REDUCING_GAP times the input), so the model input is the same
        filter over nearly the same pixels (imaging.decode_upload)."""
        return int(np.ceil(max(self.spec.input_size) * REDUCING_GAP))

    def _resized(self, image: Image.Image) -> Image.Image:
        if image.mode != "RGB":
            image = image.convert("RGB")
        height, width = self.spec.input_size
        if image.size != (width, height):
            image = image.resize((width, height), _RESAMPLE[self.spec.interpolation],
                                 reducing_gap=REDUCING_GAP)
        return image

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        """(3,H,W) float32 in [0,1] at the model's input size; an image already that size is not resampled."""
        array = np.asarray(self._resized(image), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel space [0,1] -> model-input space; works on (3,H,W) or (B,3,H,W) on any device/dtype."""
        mean = torch.tensor(self.spec.mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.spec.std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        return (pixels - mean) / std

    @cached_property
    def _levels(self) -> np.ndarray:
        """(3, 256): the model-input value of each 8-bit level, per channel (computed once, in float64)."""
        levels = np.arange(256, dtype=np.float64) / 255.0
        mean, std = (np.asarray(v, dtype=np.float64)[:, None] for v in (self.spec.mean, self.spec.std))
        return ((levels[None, :] - mean) / std).astype(np.float32)

    def to_array(self, image: Image.Image) -> np.ndarray:
        """(3,H,W) float32 in model-input space, computed in numpy.

        numpy, not torch: this runs in request threads, and every thread that runs a large torch op gets its
        own OpenMP team. With more team threads than cores, libgomp stops spinning between ops and the worker
        thread's passes slow down (docs/benchmarks.md, section "OpenMP teams"). Normalising is a table lookup
        per channel (8-bit levels in, floats out), faster than the arithmetic (docs/benchmarks.md, section
        "Service overhead: one request on an idle server").
        """
        pixels = np.asarray(self._resized(image))  # (H, W, 3) uint8
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._levels[channel], pixels[:, :, channel], out=out[channel])
        return out

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """(B,3,H,W) model input for several images."""
        return torch.from_numpy(np.stack([self.to_array(image) for image in images]))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.to_array(image))
