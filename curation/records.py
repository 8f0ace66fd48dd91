"""Turning one raw (image bytes, caption) row into a canonical pair, or a reject.

Every entry point (demo data, img2dataset output, Parquet with image bytes, a
folder of images) funnels through `make_pair`, so the checks are the same
whatever the source.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

from curation.rejects import Reason

# Above this many pixels an image is treated as a decompression bomb, not decoded.
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default; kept explicit so it is one place to change.
MAX_CAPTION_CHARS = 20_000
EXIF_ORIENTATION = 0x0112
QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that transpose the stored pixels


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def image_size(data: bytes | None) -> tuple[int, int] | Rejected:
    """Width and height of an encoded image as it is shown, after fully decoding it (a truncated JPEG fails
    here): an EXIF orientation that turns it a quarter (5 to 8) swaps them, as the caption stage and the
    trainer turn the image upright before they use it."""
    if not data:
        return Rejected(Reason.EMPTY_IMAGE, "no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    return Rejected(Reason.IMAGE_TOO_LARGE, f"{width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")
                im.load()
                if im.getexif().get(EXIF_ORIENTATION, 1) in QUARTER_TURNS:
                    width, height = height, width
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Rejected(Reason.IMAGE_TOO_LARGE, str(exc)[:200])
    except Exception as exc:  # Pillow raises many types for broken data; all mean the same here.
        return Rejected(Reason.UNDECODABLE_IMAGE, f"{type(exc).__name__}: {exc}"[:200])
    if width <= 0 or height <= 0:
        return Rejected(Reason.EMPTY_IMAGE, f"{width}x{height}")
    return width, height


def is_utf8(text: str) -> bool:
    """False for text that holds bytes which were not UTF-8 (read with surrogateescape, kept as surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_caption(raw: object, max_chars: int = MAX_CAPTION_CHARS) -> str | Rejected:
    """Decode and trim a caption; reject empty, non-UTF-8, non-text or oversized ones."""
    if raw is None:
        return Rejected(Reason.EMPTY_CAPTION, "caption is null")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejected(Reason.NON_UTF8_CAPTION, str(exc)[:200])
    elif not isinstance(raw, str):  # a JSONL number or list, a Parquet int column: not a caption
        return Rejected(Reason.MISSING_FIELD, f"caption is {type(raw).__name__}, not text")
    elif not is_utf8(raw):  # a list file's invalid bytes, kept as surrogates
        return Rejected(Reason.NON_UTF8_CAPTION, "caption holds bytes that are not UTF-8")
    text = " ".join(raw.split())
    if not text:
        return Rejected(Reason.EMPTY_CAPTION, "caption is empty or whitespace")
    if len(text) > max_chars:
        return Rejected(Reason.CAPTION_TOO_LONG, f"{len(text)} characters > {max_chars}")
    return text


def make_pair(key: str, image: bytes | None, caption: str | bytes | None, *, source: str,
              url: str | None = None, max_caption_chars: int = MAX_CAPTION_CHARS) -> dict | Rejected:
    """A canonical pair row (core columns only), or the reason it cannot be one."""
    text = clean_caption(caption, max_caption_chars)
    if isinstance(text, Rejected):
        return text
    size = image_size(image)
    if isinstance(size, Rejected):
        return size
    return {
        "key": key, "url": url, "caption": text, "image": image,
        "width": size[0], "height": size[1],
        "sha256": hashlib.sha256(image).hexdigest(), "source": source,
    }
