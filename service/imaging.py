"""Decoding and validating uploaded images; encoding saliency maps as .npy, PNG and overlays.

Pillow and numpy only: this module must not pull in torch.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Formats whose decoders are built into Pillow. Anything else (EPS runs Ghostscript, for one) is refused
# rather than handed to a decoder we did not mean to expose. JPEG also admits MPO (many phone photos).
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")

_WHITE = (255, 255, 255)
# Shrinking a photo: Pillow first reduces by a whole factor in blocks while the image stays >= this many times
# the target, then resamples: within 2 levels of the full filter (tests/test_zoo.py), in much less time for a
# large photo (docs/benchmarks.md, section "Photo sizes").
REDUCING_GAP = 3.0
# What Pillow raises on malformed data besides OSError: PNG chunk errors are SyntaxError, some
# header parsers raise struct.error or ValueError, and compressed streams zlib.error.
_CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
# Pillow's own bomb guard: the Warning is an Exception subclass, raised only when a warnings filter
# escalates it; we catch it rather than change the process-wide filters (not thread-safe).
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An uploaded image was refused; the message names the image and the problem."""


@dataclass(frozen=True)
class Upload:
    """A decoded upload: its pixels, possibly at a reduced scale, and its size as people see it."""

    image: Image.Image  # upright 8-bit RGB; a large JPEG comes at 1/2, 1/4 or 1/8 of its size
    size: tuple[int, int]  # (width, height) of the upload, EXIF orientation applied

    @property
    def reduced(self) -> bool:
        return self.image.size != self.size


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, index: int = 0) -> Image.Image:
    """The upload as an upright 8-bit RGB image at its full size; ImageError naming the problem otherwise."""
    return _decode(data, max_bytes=max_bytes, max_pixels=max_pixels, index=index, min_side=None).image


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int, index: int = 0) -> Upload:
    """As `decode_image`, but a JPEG whose sides both reach twice `min_side` or more is decoded at a reduced
    scale (1/2, 1/4 or 1/8, the largest whose sides stay >= `min_side`): libjpeg scales in the DCT, so it does
    that much less of the decoding. For a phone photo that is most of the time to decode and resize it to the
    model input, which stays within 2 levels of the whole decode under Pillow's full filter
    (bench/photo_sizes.py; docs/benchmarks.md, section "Photo sizes")."""
    return _decode(data, max_bytes=max_bytes, max_pixels=max_pixels, index=index, min_side=min_side)


def _decode(data: bytes, *, max_bytes: int, max_pixels: int, index: int, min_side: int | None) -> Upload:
    """Decode uploaded bytes into a new RGB image, refusing anything unsafe or broken.

    The pixel count is checked from the header before any pixel is decoded, so a small file that declares a
    huge canvas (a decompression bomb) costs nothing. `index` only labels error messages.
    """
    label = f"image {index}"
    if not data:
        raise ImageError(f"{label}: empty upload")
    if len(data) > max_bytes:
        raise ImageError(f"{label}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            image_format = opened.format or "image"
            try:
                opened.seek(0)  # animated images: explain the first frame
                if min_side and image_format in ("JPEG", "MPO"):
                    opened.draft(None, (min_side, min_side))  # scale only; the mode is left as stored
                opened.load()
            except _BOMB_ERRORS as error:
                raise _bomb_error(label, max_pixels, error) from error
            except _CORRUPT_DATA_ERRORS as error:
                raise ImageError(f"{label}: truncated or corrupt {image_format}") from error
            upright, turned = _upright(opened)
            return Upload(_to_rgb(upright, label), (height, width) if turned else (width, height))
    except UnidentifiedImageError as error:
        raise ImageError(f"{label}: not a recognised image format") from error
    except _BOMB_ERRORS as error:
        raise _bomb_error(label, max_pixels, error) from error
    except ImageError:
        raise
    except _CORRUPT_DATA_ERRORS as error:  # a header Pillow recognised but could not parse
        raise ImageError(f"{label}: corrupt image header") from error


def declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) as stored, from the image's header, without decoding it (an EXIF orientation may swap
    them); (0, 0) when there is no readable header (`decode_image` then says what is wrong)."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as opened:
            width, height = opened.size
            return width, height
    except (UnidentifiedImageError, *_BOMB_ERRORS, *_CORRUPT_DATA_ERRORS):
        return 0, 0


def declared_pixels(data: bytes) -> int:
    """Width x height from the image's header, without decoding it; 0 when there is no readable header."""
    width, height = declared_size(data)
    return width * height


def _bomb_error(label: str, max_pixels: int, error: Exception) -> ImageError:
    """Pillow refused the declared size before we could read it; name the limit that was certainly passed."""
    pillow_limit = Image.MAX_IMAGE_PIXELS or max_pixels
    if isinstance(error, Image.DecompressionBombError):
        pillow_limit *= 2  # Pillow warns above its limit and refuses above twice it
    return ImageError(f"{label}: declared size exceeds the limit of {min(max_pixels, pillow_limit)} pixels")


def _upright(image: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation, so that maps line up with the image as people see it; and whether it
    turned the image a quarter (orientations 5-8 swap width and height)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        return ImageOps.exif_transpose(image), orientation in (5, 6, 7, 8)
    except _CORRUPT_DATA_ERRORS:
        return image, False  # broken EXIF should not cost the user the image; keep the stored orientation


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """A new 8-bit RGB image: alpha composited onto white, 16-bit and float data rescaled."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _gray_to_rgb(_unit_gray(np.asarray(image, dtype=np.float64), image.mode))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(f"{label}: unsupported colour mode {image.mode}") from error


def _unit_gray(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel integer or float pixels in [0, 1]. Pillow's own conversion clips 16-bit values at 255
    instead of scaling them. 16-bit data (mode I holds it too) scales by 65535 and [0, 1] floats stay; any
    other range (32-bit integers, floats such as depth) is stretched over its finite values, with NaN and -inf
    at its low end and +inf at its high end, so one bad pixel cannot black out the image."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros_like(values)
    low, high = float(values[finite].min()), float(values[finite].max())
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    top = 1.0 if mode == "F" else 65535.0
    if low >= 0.0 and high <= top:
        return values / top
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _gray_to_rgb(unit: np.ndarray) -> Image.Image:
    gray = np.round(unit * 255.0).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


# --- saliency maps ---------------------------------------------------------------------------------


def encode_npy(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, arr, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    # allow_pickle=False: a .npy from elsewhere must never be able to run code.
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_png_gray(heat: np.ndarray) -> bytes:
    """An HxW map in [0, 1] as an 8-bit grayscale PNG (values outside are clipped, NaN becomes 0)."""
    if heat.ndim != 2:
        raise ValueError(f"expected an HxW map, got shape {heat.shape}")
    return encode_png(Image.fromarray(_levels(heat)))


def resize_map(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an HxW map to `size` = (width, height); float32 in [0, 1]."""
    if heat.ndim != 2:
        raise ValueError(f"expected an HxW map, got shape {heat.shape}")
    resized = Image.fromarray(_unit(heat).astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _levels(heat: np.ndarray) -> np.ndarray:
    """A map in [0, 1] as 8-bit levels (clipped, NaN as 0), in place on one float32 copy: faster than the
    chained expression on a large map (docs/benchmarks.md, section "Photo sizes")."""
    scaled = np.multiply(heat, np.float32(255.0), dtype=np.float32)
    np.nan_to_num(scaled, copy=False, nan=0.0)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def _unit(heat: np.ndarray) -> np.ndarray:
    # float32: maps are float32 already, and a float64 copy of a 12 MP map is 100 MB of memory traffic.
    return np.clip(np.nan_to_num(heat.astype(np.float32, copy=False), nan=0.0), 0.0, 1.0)


# --- colour overlays -------------------------------------------------------------------------------

# A few anchor colours per map, interpolated into 256-entry lookup tables. Built here rather than taken
# from matplotlib so the service does not carry a plotting library for three gradients.
_ANCHORS: dict[str, list[tuple[float, str]]] = {
    "jet": [
        (0.0, "#000080"), (0.125, "#0000ff"), (0.375, "#00ffff"),
        (0.625, "#ffff00"), (0.875, "#ff0000"), (1.0, "#800000"),
    ],
    "viridis": [
        (i / 8, colour) for i, colour in enumerate(
            ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21908c",
             "#27ad81", "#5dc863", "#aadc32", "#fde725"]
        )
    ],
    "inferno": [
        (i / 9, colour) for i, colour in enumerate(
            ["#000004", "#1b0c42", "#4b0c6b", "#781c6d", "#a52c60",
             "#cf4446", "#ed6925", "#fb9a06", "#f7d03c", "#fcffa4"]
        )
    ],
}


def _lookup_table(anchors: list[tuple[float, str]]) -> np.ndarray:
    positions = np.array([position for position, _ in anchors])
    colours = np.array([[int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)] for _, hex_colour in anchors])
    levels = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(levels, positions, colours[:, channel]) for channel in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


COLORMAPS: dict[str, np.ndarray] = {name: _lookup_table(anchors) for name, anchors in _ANCHORS.items()}


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """Colour `heat` (HxW in [0, 1], any size) with `colormap` and blend it over `image` at its size."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    base = image.convert("RGB")
    width, height = base.size
    fitted = resize_map(heat, base.size) if heat.shape != (height, width) else heat
    colours = Image.fromarray(COLORMAPS[colormap][_levels(fitted)])
    # Pillow blends 8-bit bands in C (it truncates where float math rounds: at most 1 level apart), far faster
    # than float arrays on a large photo (docs/benchmarks.md, section "Photo sizes").
    return Image.blend(base, colours, alpha)


# zlib settings by content (bench/photo_sizes.py; docs/benchmarks.md, section "Photo sizes"). Gray maps are
# smooth: the default strategy at level 1 (Pillow's default level 6 took several times as long). Overlays
# carry the photo: after PNG's row filters, Huffman coding alone beat level 6 in both time and size.
PNG_COMPRESS_LEVEL = 1


def encode_png(img: Image.Image, *, photo: bool = False) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL,
             compress_type=zlib.Z_HUFFMAN_ONLY if photo else zlib.Z_DEFAULT_STRATEGY)
    return buffer.getvalue()
