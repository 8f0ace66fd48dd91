"""Turning stored image bytes into a bounded RGB picture a captioner can take.

Web images arrive in every mode (CMYK, palette, alpha, 16-bit), rotated by
EXIF, and sometimes huge. A VLM wants plain RGB of a sane size, and one
pathological image must not take a worker down: the pixel count is checked
from the header before anything is decoded, big JPEGs are decoded at a
reduced scale (libjpeg's DCT scaling via `draft`), other big images are
shrunk with `reduce` before resampling, and anything beyond the limits is a
counted reject, never an out-of-memory error.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from curation.records import MAX_IMAGE_PIXELS, Rejected
from curation.rejects import Reason

# What a preparation did to an image, for the stage's counters.
DOWNSCALED = "downscaled"
DECODED_AT_REDUCED_SCALE = "decoded_at_reduced_scale"
EXIF_ROTATED = "exif_rotated"
MODE_CONVERTED = "mode_converted"
ALPHA_FLATTENED = "alpha_flattened"
UPSCALED = "upscaled"


@dataclass(frozen=True)
class ImageConfig:
    """Limits for image preparation.

    `max_side` caps the longest side handed to the captioner (VLM processors
    resize again; this bounds memory and transfer). `max_decode_pixels` is the
    most pixels decoded at full scale; JPEGs up to `max_jpeg_pixels` are still
    accepted because they are decoded at 1/2, 1/4 or 1/8 scale.
    """

    max_side: int = 768
    min_side: int = 16
    max_decode_pixels: int = MAX_IMAGE_PIXELS
    max_jpeg_pixels: int = 2 * MAX_IMAGE_PIXELS
    max_aspect_ratio: float = 50.0
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if not 0 < self.min_side <= self.max_side:
            raise ValueError(f"need 0 < min_side <= max_side, got {self.min_side} and {self.max_side}")
        if self.max_decode_pixels <= 0 or self.max_jpeg_pixels <= 0:
            raise ValueError("pixel limits must be positive")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    @property
    def aspect_limit(self) -> float:
        """The widest shape that fits both sides' bounds: a 5000x100 image scaled to 768 long is 15 short,
        and scaled up to 16 short it is 819 long, over `max_side`. So it is refused, not bent."""
        return min(self.max_aspect_ratio, self.max_side / self.min_side)


@dataclass
class PreparedImage:
    """An RGB image within the limits, and what was done to get it there."""

    image: Image.Image
    source_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


def prepare_image(data: bytes | None, config: ImageConfig = ImageConfig()) -> PreparedImage | Rejected:
    """Decode, orient, convert to RGB and cap the size of one encoded image; or say why it cannot be."""
    if not data:
        return Rejected(Reason.EMPTY_IMAGE, "no image bytes")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it; the checks below decide instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        width, height = im.size
        checked = _check_size(width, height, im.format, config)
        if checked is not None:
            return checked
        if im.format == "JPEG" and max(width, height) > config.max_side:
            # Let libjpeg decode at the largest 1/2^k scale still >= max_side: far less memory and time.
            im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else None, (config.max_side, config.max_side))
            if im.size != (width, height):
                notes.append(DECODED_AT_REDUCED_SCALE)
        im.load()
        im = _orient(im, notes)
        im = to_rgb(im, config.background, notes)
        im = _fit(im, config, notes)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Rejected(Reason.IMAGE_TOO_LARGE, str(exc)[:200])
    except MemoryError as exc:
        return Rejected(Reason.IMAGE_TOO_LARGE, f"MemoryError while decoding: {exc}"[:200])
    except Exception as exc:  # Pillow raises many types for broken data; all mean the same here.
        return Rejected(Reason.UNDECODABLE_IMAGE, f"{type(exc).__name__}: {exc}"[:200])
    return PreparedImage(im, (width, height), notes)


def _check_size(width: int, height: int, fmt: str | None, config: ImageConfig) -> Rejected | None:
    if width <= 0 or height <= 0:
        return Rejected(Reason.EMPTY_IMAGE, f"{width}x{height}")
    limit = config.max_jpeg_pixels if fmt == "JPEG" else config.max_decode_pixels
    if width * height > limit:
        return Rejected(Reason.IMAGE_TOO_LARGE, f"{width}x{height} {fmt or 'image'} exceeds {limit} pixels")
    if max(width, height) / min(width, height) > config.aspect_limit:
        return Rejected(Reason.EXTREME_ASPECT_RATIO, f"{width}x{height} exceeds aspect ratio {config.aspect_limit:g}")
    return None


def _orient(im: Image.Image, notes: list[str]) -> Image.Image:
    """Apply the EXIF orientation tag, so a phone photo is captioned the right way up."""
    orientation = im.getexif().get(0x0112, 1)
    if orientation not in range(2, 9):  # 1 is upright; 0, 9 and others are no orientation EXIF defines
        return im
    notes.append(EXIF_ROTATED)
    return ImageOps.exif_transpose(im)


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255),
           notes: list[str] | None = None) -> Image.Image:
    """RGB from any mode; transparent pixels are laid on `background` rather than turning black (the trainer
    decodes this way too, so CLIP trains on the picture the VLM captioned).

    A transparency colour (PNG's tRNS) counts in every mode that has one: greyscale and RGB ones turned black."""
    notes = [] if notes is None else notes
    transparent = "transparency" in im.info
    if im.mode == "RGB" and not transparent:
        return im
    notes.append(MODE_CONVERTED)
    if transparent and im.mode in ("P", "L", "RGB", "1"):
        im = im.convert("RGBA")
    elif im.mode == "P":
        im = im.convert("RGB")
    elif im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit or float greyscale: scale to 8 bits by its range instead of clipping (above 255 to white;
        # a float image in [0, 1] to black). Its tRNS grey becomes an alpha channel first: Pillow's own
        # conversion drops it, and a 16-bit PNG's transparent pixels were captioned in grey.
        alpha = (Image.fromarray(np.where(np.asarray(im) == im.info["transparency"], 0, 255).astype(np.uint8))
                 if transparent else None)
        low, high = im.getextrema()
        span = (high - low) or 1
        im = im.point(lambda v: (v - low) * 255 / span).convert("L")
        if alpha is not None:
            im = Image.merge("LA", (im, alpha))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append(ALPHA_FLATTENED)
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def _fit(im: Image.Image, config: ImageConfig, notes: list[str]) -> Image.Image:
    """Longest side at most max_side, shortest at least min_side, aspect ratio kept."""
    width, height = im.size
    longest, shortest = max(width, height), min(width, height)
    if longest > config.max_side:
        notes.append(DOWNSCALED)
        scale = config.max_side / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # reducing_gap: integer box-reduce first, then a precise resample of the small result.
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
        width, height = im.size
        shortest = min(width, height)
    if shortest < config.min_side:
        notes.append(UPSCALED)
        scale = config.min_side / shortest
        im = im.resize((max(config.min_side, round(width * scale)), max(config.min_side, round(height * scale))),
                       Image.Resampling.BICUBIC)
    return im
