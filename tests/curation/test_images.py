"""Image preparation: every mode to RGB, EXIF orientation, size caps, and bad input as counted rejects."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from curation.images import (ALPHA_FLATTENED, DECODED_AT_REDUCED_SCALE, DOWNSCALED, EXIF_ROTATED, ImageConfig,
                             PreparedImage, prepare_image, to_rgb)
from curation.records import Rejected
from curation.rejects import Reason


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def prepared(data: bytes, config: ImageConfig = ImageConfig()) -> PreparedImage:
    out = prepare_image(data, config)
    assert isinstance(out, PreparedImage), out
    assert out.image.mode == "RGB"
    return out


def test_cmyk_jpeg_becomes_rgb_with_the_same_colour():
    out = prepared(encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = out.image.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red


def test_palette_with_transparency_is_flattened_on_white():
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 10, 20))
    out = prepared(encode(im, "PNG", transparency=0))
    assert ALPHA_FLATTENED in out.notes
    assert out.image.getpixel((15, 10)) == (255, 255, 255)  # transparent half is background, not black
    assert out.image.getpixel((5, 10)) == (255, 0, 0)


def test_rgba_and_16_bit_grey_convert():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))
    assert prepared(encode(rgba, "PNG")).image.getpixel((3, 3)) == (255, 255, 255)
    grey16 = Image.new("I;16", (16, 16))
    grey16.putpixel((0, 0), 1000)
    out = prepared(encode(grey16, "PNG"))
    assert out.image.getpixel((0, 0))[0] == 255 and out.image.getpixel((5, 5))[0] == 0  # scaled, not clipped
    floats = Image.new("F", (16, 16), 0.25)  # a float TIFF in [0, 1] came out black: clipped, not scaled
    floats.putpixel((0, 0), 1.0)
    out = prepared(encode(floats, "TIFF"))
    assert out.image.getpixel((0, 0))[0] == 255 and out.image.getpixel((5, 5))[0] == 0


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = prepared(encode(im, "JPEG", exif=exif.tobytes()))
    assert EXIF_ROTATED in out.notes
    assert out.image.size == (20, 40)
    for undefined in (0, 9):  # no orientation EXIF defines: nothing turns, and nothing is counted
        exif[0x0112] = undefined
        out = prepared(encode(im, "JPEG", exif=exif.tobytes()))
        assert EXIF_ROTATED not in out.notes and out.image.size == (40, 20)


def test_large_jpeg_is_decoded_at_reduced_scale_and_capped():
    data = encode(Image.new("RGB", (4000, 3000), (200, 30, 30)), "JPEG", quality=70)
    out = prepared(data, ImageConfig(max_side=256))
    assert DECODED_AT_REDUCED_SCALE in out.notes and DOWNSCALED in out.notes
    assert max(out.image.size) == 256 and out.image.size == (256, 192)
    assert out.source_size == (4000, 3000)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header (with a correct CRC) claims another size."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims another size."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("data", [_png_claiming(20000, 20000), _jpeg_claiming(20000, 20000)],
                         ids=["png", "jpeg"])
def test_20000_square_image_is_rejected_from_its_header_without_decoding(data):
    out = prepare_image(data)
    assert isinstance(out, Rejected) and out.reason == Reason.IMAGE_TOO_LARGE
    assert "20000x20000" in out.detail or "pixels" in out.detail


def test_big_non_jpeg_over_decode_limit_is_rejected_but_jpeg_of_same_size_is_allowed():
    config = ImageConfig(max_decode_pixels=1_000_000, max_jpeg_pixels=20_000_000)
    assert prepare_image(_png_claiming(2000, 2000), config).reason == Reason.IMAGE_TOO_LARGE
    out = prepared(encode(Image.new("RGB", (2000, 2000), (0, 0, 0)), "JPEG"), config)
    assert DECODED_AT_REDUCED_SCALE in out.notes


@pytest.mark.parametrize("data,reason", [
    (b"", Reason.EMPTY_IMAGE),
    (None, Reason.EMPTY_IMAGE),
    (b"not an image at all", Reason.UNDECODABLE_IMAGE),
    (encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200], Reason.UNDECODABLE_IMAGE),
    (_png_claiming(0, 10), Reason.UNDECODABLE_IMAGE),
    (encode(Image.new("RGB", (2000, 10)), "PNG"), Reason.EXTREME_ASPECT_RATIO),
], ids=["empty", "none", "garbage", "truncated", "zero-width", "sliver"])
def test_bad_images_are_counted_rejects_not_crashes(data, reason):
    out = prepare_image(data)
    assert isinstance(out, Rejected)
    assert out.reason == reason or (reason == Reason.UNDECODABLE_IMAGE and out.reason == Reason.EMPTY_IMAGE)


def test_tiny_image_is_upscaled_to_min_side():
    out = prepared(encode(Image.new("RGB", (4, 8), (9, 9, 9)), "PNG"), ImageConfig(min_side=16))
    assert min(out.image.size) == 16 and out.image.size == (16, 32)


def test_every_prepared_image_fits_both_side_bounds():
    """50:1 passed max_aspect_ratio (50), then came out 819x16: over max_side (768), which the captioner's
    memory bound relies on. The widest shape allowed is max_side / min_side."""
    config = ImageConfig()
    out = prepare_image(encode(Image.new("RGB", (5000, 100)), "PNG"), config)
    assert isinstance(out, Rejected) and out.reason == Reason.EXTREME_ASPECT_RATIO and "aspect ratio 48" in out.detail
    widest = prepared(encode(Image.new("RGB", (4800, 100)), "PNG"), config)
    assert widest.image.size == (768, 16)


def test_a_transparency_colour_is_laid_on_the_background_in_every_mode():
    """Only palette images read PNG's tRNS colour: transparent pixels of greyscale and RGB ones turned black,
    and the trainer turned every transparent pixel black."""
    from training.image_transforms import decode

    for mode, colour in (("L", 0), ("RGB", (0, 0, 0)), ("P", 0)):
        image = Image.new(mode, (32, 32), colour)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", transparency=colour)
        assert to_rgb(Image.open(io.BytesIO(buffer.getvalue()))).getpixel((5, 5)) == (255, 255, 255), mode
        assert decode(buffer.getvalue()).getpixel((5, 5)) == (255, 255, 255), mode
    # 16-bit and 1-bit greyscale PNGs carry a tRNS grey too: their transparent pixels were grey and black.
    grey16 = Image.fromarray(np.full((8, 8), 500, np.uint16))
    grey16.putpixel((1, 1), 1000)
    for image, colour, opaque in ((grey16, 500, 0), (Image.new("1", (8, 8), 0), 0, 1)):
        image.putpixel((0, 0), opaque)  # an opaque pixel: black in 16 bits, white in 1 bit
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", transparency=colour)
        opened = Image.open(io.BytesIO(buffer.getvalue()))
        assert opened.mode in ("I;16", "1") and "transparency" in opened.info, opened.mode
        rgb = to_rgb(opened)
        assert rgb.getpixel((5, 5)) == (255, 255, 255), opened.mode
        assert rgb.getpixel((0, 0)) == ((0, 0, 0) if opened.mode == "I;16" else (255, 255, 255)), opened.mode
        assert decode(buffer.getvalue()).getpixel((5, 5)) == (255, 255, 255), opened.mode
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert decode(buffer.getvalue()).getpixel((1, 1)) == (255, 255, 255)
    assert to_rgb(Image.new("RGB", (4, 4), (1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)
