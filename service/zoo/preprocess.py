"""Image -> model input: the whole image resized to the input size (no crop), RGB, normalised."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

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

    def _resized(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        height, width = self.spec.input_size
        if image.size != (width, height):
            image = image.resize((width, height), _RESAMPLE[self.spec.interpolation])
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

    def to_array(self, image: Image.Image) -> np.ndarray:
        """(3,H,W) float32 in model-input space, computed in numpy.

        numpy, not torch: this runs in request threads, and every thread that runs a large torch op gets its
        own OpenMP team. With more team threads than cores, libgomp stops spinning between ops and the worker
        thread's passes slowed by ~10 ms per Grad-CAM on 2 cores (docs/benchmarks.md).
        """
        std = np.asarray(self.spec.std, dtype=np.float32)
        scale, shift = 1.0 / (255.0 * std), np.asarray(self.spec.mean, dtype=np.float32) / std
        channels_last = np.asarray(self._resized(image), dtype=np.float32) * scale - shift
        return np.ascontiguousarray(channels_last.transpose(2, 0, 1))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """(B,3,H,W) model input for several images."""
        return torch.from_numpy(np.stack([self.to_array(image) for image in images]))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.to_array(image))
