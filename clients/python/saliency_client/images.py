"""What callers pass as images (paths, bytes, PIL images, numpy arrays) to encoded files, and back."""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from typing import cast

import numpy as np
from PIL import Image

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, not {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("a float image array must hold values in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 or float in [0, 1], not {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def to_bytes(image: ImageInput) -> bytes:
    """One image as an encoded file: files and bytes go as they are (no re-encoding); the rest as PNG."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        return _png(image)
    if isinstance(image, np.ndarray):
        return _png(_array_to_image(image))
    raise TypeError(f"cannot send {type(image).__name__} as an image: pass a path, bytes, PIL image or array")


def as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or many: lists and tuples are many; anything else (an array included) is one."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        return list(images)
    # only lists and tuples are many: any other value, a str or bytes (sequences too) included, is one image
    return [cast(ImageInput, images)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_npy(text: str | None) -> np.ndarray | None:
    if text is None:
        return None
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)  # never unpickle server data


def decode_png(text: str | None) -> Image.Image | None:
    if text is None:
        return None
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image
