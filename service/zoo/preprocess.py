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

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        """(3,H,W) float32 in [0,1] at the model's input size; an image already that size is not resampled."""
        image = image.convert("RGB")
        height, width = self.spec.input_size
        if image.size != (width, height):
            image = image.resize((width, height), _RESAMPLE[self.spec.interpolation])
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel space [0,1] -> model-input space; works on (3,H,W) or (B,3,H,W) on any device/dtype."""
        mean = torch.tensor(self.spec.mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.spec.std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        return (pixels - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_pixels(image))
