"""Decoding uploads (with every refusal) and encoding maps."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.imaging import (
    COLORMAPS,
    ImageError,
    declared_pixels,
    decode_image,
    decode_npy,
    decode_upload,
    encode_npy,
    encode_png,
    encode_png_gray,
    overlay,
    resize_map,
)

LIMITS = dict(max_bytes=10_000_000, max_pixels=40_000_000)


def save(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noise_rgb(width=32, height=24, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_declaring(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims width x height (CRC fixed so the header parses)."""
    data = bytearray(save(Image.new("RGB", (8, 8), "red"), "PNG"))
    # After the 8-byte signature: length (4), b"IHDR" (4), width (4), height (4), 5 more bytes, CRC (4).
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def decode(data: bytes, **overrides) -> Image.Image:
    return decode_image(data, **{**LIMITS, **overrides})


# --- round trips and conversions -------------------------------------------------------------------


def test_png_round_trip_is_exact():
    original = noise_rgb()
    decoded = decode(save(original, "PNG"))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(original))


def test_jpeg_decodes_to_rgb_of_the_same_size():
    decoded = decode(save(noise_rgb(), "JPEG"))
    assert decoded.mode == "RGB" and decoded.size == (32, 24)


def test_grayscale_becomes_rgb_with_equal_channels():
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    decoded = np.asarray(decode(save(gray, "PNG")))
    assert decoded.shape == (16, 16, 3)
    assert np.array_equal(decoded[..., 0], np.asarray(gray))
    assert np.array_equal(decoded[..., 0], decoded[..., 2])


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 4).round().astype(np.uint16).reshape(4, 64)
    decoded = np.asarray(decode(save(Image.fromarray(ramp), "PNG")))[..., 0].astype(int)
    expected = np.round(ramp / 65535 * 255).astype(int)
    assert np.abs(decoded - expected).max() <= 1
    assert decoded.max() == 255 and decoded[0, 32] not in (0, 255)  # mid-ramp stays mid-grey


def test_32_bit_and_float_tiffs_are_stretched_over_their_finite_range():
    ramp = np.linspace(-2**31, 2**31 - 1, 64 * 4).reshape(4, 64)
    wide = np.asarray(decode(save(Image.fromarray(ramp.astype(np.int32), "I"), "TIFF")))[..., 0].astype(int)
    assert wide[0, 0] == 0 and wide[-1, -1] == 255 and 100 < wide[2, 0] < 155  # not clipped to white
    depth = np.linspace(0.0, 10.0, 64 * 4).reshape(4, 64).astype(np.float32)
    depth[0, 0], depth[0, 1], depth[0, 2] = np.inf, np.nan, -np.inf
    gray = np.asarray(decode(save(Image.fromarray(depth, "F"), "TIFF")))[..., 0].astype(int)
    finite = np.round((depth[1:] - depth[0, 3]) / (10.0 - depth[0, 3]) * 255)
    assert np.abs(gray[1:] - finite).max() <= 1  # one +inf pixel does not black the image out
    assert (gray[0, 0], gray[0, 1], gray[0, 2]) == (255, 0, 0)
    unit = np.asarray(decode(save(Image.fromarray(depth[1:] / 10.0, "F"), "TIFF")))[..., 0].astype(int)
    assert np.abs(unit - np.round(depth[1:] / 10.0 * 255)).max() <= 1  # a [0, 1] float image keeps its levels


def test_palette_png_keeps_its_colours():
    original = noise_rgb().quantize(16)
    decoded = decode(save(original, "PNG"))
    assert np.array_equal(np.asarray(decoded), np.asarray(original.convert("RGB")))


def test_transparent_pixels_are_composited_onto_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
    decoded = np.asarray(decode(save(Image.fromarray(rgba), "PNG"))).astype(int)
    assert tuple(decoded[0, 0]) == (255, 0, 0)
    assert tuple(decoded[0, 1]) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in decoded[1, 0])


def test_palette_transparency_is_composited_onto_white():
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.putpixel((1, 1), 1)
    decoded = np.asarray(decode(save(palette_image, "PNG", transparency=0)))
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    assert tuple(decoded[1, 1]) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    decoded = np.asarray(decode(save(cyan, "JPEG", quality=95))).astype(int)
    assert decoded.shape == (16, 16, 3)
    red, green, blue = decoded[8, 8]
    assert red < 30 and green > 225 and blue > 225


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = save(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert decode(data).size == (20, 40)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert tuple(np.asarray(decode(data))[4, 4]) == (255, 0, 0)


def test_decoded_image_is_a_new_detached_image():
    decoded = decode(save(noise_rgb(), "PNG"))
    decoded.putpixel((0, 0), (1, 2, 3))  # writable, not tied to the upload buffer
    assert decoded.getpixel((0, 0)) == (1, 2, 3)


# --- refusals --------------------------------------------------------------------------------------


def test_empty_upload_is_refused():
    with pytest.raises(ImageError, match="image 0: empty"):
        decode(b"")


def test_upload_over_max_bytes_is_refused():
    data = save(noise_rgb(), "PNG")
    with pytest.raises(ImageError, match=f"image 3: {len(data)} bytes exceeds the limit of 100 bytes"):
        decode(data, max_bytes=100, index=3)


def test_text_is_not_an_image():
    with pytest.raises(ImageError, match="image 2: not a recognised image format"):
        decode(b"hello, this is plain text and not a picture", index=2)


def test_formats_outside_the_allow_list_are_refused():
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode(save(noise_rgb(), "PPM"))


def test_declared_size_over_max_pixels_is_refused_from_the_header():
    with pytest.raises(ImageError, match="image 0: 8000x6000 pixels exceeds the limit of 40000000 pixels"):
        decode(png_declaring(8000, 6000))


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match="image 0: declared size exceeds the limit of 40000000 pixels"):
        decode(png_declaring(50_000, 50_000))


def test_truncated_png_is_refused():
    data = save(noise_rgb(64, 64), "PNG")
    with pytest.raises(ImageError, match="image 1: truncated or corrupt PNG"):
        decode(data[: len(data) // 2], index=1)


def test_truncated_jpeg_is_refused():
    data = save(noise_rgb(64, 64), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt JPEG"):
        decode(data[: len(data) // 2])


def test_corrupt_png_data_is_refused():
    data = bytearray(save(noise_rgb(64, 64), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(64)  # damage the compressed stream (and its CRC no longer matches)
    with pytest.raises(ImageError, match="image 0: "):
        decode(bytes(data))


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# --- maps ------------------------------------------------------------------------------------------


def test_npy_round_trip():
    heat = np.random.default_rng(1).random((7, 5)).astype(np.float32)
    back = decode_npy(encode_npy(heat))
    assert back.dtype == np.float32 and np.array_equal(back, heat)


def test_npy_refuses_pickled_objects():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(buffer.getvalue())


def test_png_gray_decodes_back_to_the_map_within_one_level():
    heat = np.random.default_rng(2).random((20, 30))
    image = Image.open(io.BytesIO(encode_png_gray(heat)))
    assert image.mode == "L" and image.size == (30, 20)
    assert np.abs(np.asarray(image) / 255.0 - heat).max() <= 1 / 255


def test_png_gray_clips_out_of_range_values():
    image = Image.open(io.BytesIO(encode_png_gray(np.array([[-1.0, 2.0, np.nan]]))))
    assert np.asarray(image).tolist() == [[0, 255, 0]]


def test_resize_map_takes_width_then_height():
    resized = resize_map(np.full((4, 6), 0.25), (60, 40))
    assert resized.shape == (40, 60) and resized.dtype == np.float32
    assert np.allclose(resized, 0.25, atol=1e-6)


def test_resize_map_stays_in_unit_range():
    heat = np.zeros((8, 8))
    heat[::2, ::2] = 1.0
    resized = resize_map(heat, (37, 23))
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    assert 0.0 < resized.mean() < 1.0


@pytest.mark.parametrize("size", [(300, 451), (100, 150), (224, 100), (7, 9)])
def test_the_workers_map_resize_is_pillows(size):
    # engine.resize_maps resizes on the worker (torch) what encoding resized with Pillow: the same maps.
    import torch

    from service.engine import resize_maps

    heat = torch.rand(2, 224, 224, generator=torch.Generator().manual_seed(0))
    sized = resize_maps(heat, [size, None])
    assert sized[1] is None and sized[0].shape == size
    expected = resize_map(heat[0].numpy(), (size[1], size[0]))
    assert np.abs(sized[0].numpy() - expected).max() < 5e-5


# --- overlays --------------------------------------------------------------------------------------


def test_colormaps_are_256_entry_tables_with_the_expected_ends():
    for table in COLORMAPS.values():
        assert table.shape == (256, 3) and table.dtype == np.uint8
    assert tuple(COLORMAPS["jet"][0]) == (0, 0, 128) and tuple(COLORMAPS["jet"][-1]) == (128, 0, 0)
    assert tuple(COLORMAPS["viridis"][-1]) == (0xFD, 0xE7, 0x25)
    assert tuple(COLORMAPS["inferno"][0]) == (0, 0, 4)


def test_overlay_has_the_size_of_the_image():
    image = noise_rgb(50, 30)
    result = overlay(image, np.random.default_rng(3).random((7, 7)), alpha=0.4, colormap="viridis")
    assert result.mode == "RGB" and result.size == (50, 30)


def test_overlay_alpha_zero_is_the_image_and_alpha_one_the_colours():
    image = noise_rgb(10, 10)
    heat = np.zeros((10, 10))
    assert np.array_equal(np.asarray(overlay(image, heat, alpha=0.0)), np.asarray(image))
    coloured = np.asarray(overlay(image, heat, alpha=1.0, colormap="inferno"))
    assert (coloured == COLORMAPS["inferno"][0]).all()


def test_overlay_is_the_alpha_blend_of_image_and_colours_within_one_level():
    # Oracle: the blend in float64 with rounding; Pillow's 8-bit blend truncates, so at most 1 level apart.
    image = noise_rgb(40, 30)
    levels = np.random.default_rng(4).integers(0, 256, (30, 40))
    heat = levels / 255.0
    expected = 0.4 * COLORMAPS["jet"][levels] + 0.6 * np.asarray(image, dtype=np.float64)
    got = np.asarray(overlay(image, heat, alpha=0.4), dtype=np.float64)
    assert np.abs(got - expected).max() <= 1.0


def test_overlay_rejects_unknown_colormap_and_bad_alpha():
    with pytest.raises(ValueError, match="unknown colormap"):
        overlay(noise_rgb(), np.zeros((2, 2)), colormap="rainbow")
    with pytest.raises(ValueError, match="alpha"):
        overlay(noise_rgb(), np.zeros((2, 2)), alpha=1.5)


def test_encode_png_round_trip():
    image = noise_rgb()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), np.asarray(image))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image, photo=True)))),
                          np.asarray(image))


def test_declared_pixels_reads_the_header_only():
    assert declared_pixels(save(noise_rgb(80, 60), "JPEG")) == 4800
    assert declared_pixels(png_declaring(3000, 2000)) == 6_000_000  # no pixel data behind the header
    assert declared_pixels(b"not an image") == 0 and declared_pixels(b"") == 0


# --- reduced decoding of large JPEGs ---------------------------------------------------------------


def photo(width: int, height: int) -> Image.Image:
    """A smooth photo-like image (noise blown up), as a phone camera's JPEG would hold."""
    return noise_rgb(40, 30, seed=4).resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize(("size", "scaled"), [((2016, 1512), (1008, 756)), ((4032, 3024), (1008, 756)),
                                              ((1300, 1400), (1300, 1400)), ((451, 300), (451, 300))])
def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_min_side(size, scaled):
    upload = decode_upload(save(photo(*size), "JPEG", quality=90), **LIMITS, min_side=672)
    assert upload.size == size and upload.image.size == scaled and upload.image.mode == "RGB"
    assert upload.reduced == (scaled != size)


def test_a_reduced_decode_is_the_whole_decode_shrunk():
    """Oracle: the whole decode resized to the reduced size with a box filter (what a DCT scaling
    averages)."""
    data = save(photo(2016, 1512), "JPEG", quality=95)
    reduced = np.asarray(decode_upload(data, **LIMITS, min_side=672).image, dtype=np.int16)
    whole = np.asarray(decode(data).resize((1008, 756), Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(reduced - whole).mean() < 1.0 and np.percentile(np.abs(reduced - whole), 99) <= 4


def test_a_reduced_decode_reports_the_upright_size():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored 2016 x 1512 is seen as 1512 x 2016
    upload = decode_upload(save(photo(2016, 1512), "JPEG", exif=exif), **LIMITS, min_side=672)
    assert upload.size == (1512, 2016) and upload.image.size == (756, 1008)


def test_other_formats_are_decoded_whole():
    upload = decode_upload(save(photo(1600, 1400), "PNG"), **LIMITS, min_side=672)
    assert upload.image.size == upload.size == (1600, 1400) and not upload.reduced
