import io

from PIL import Image

from curation.records import Rejected, clean_caption, image_size, make_pair
from curation.rejects import Reason


def jpeg(size=(20, 10), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "red").save(out, format="JPEG")
    return out.getvalue()


def test_good_pair_has_size_and_hash():
    pair = make_pair("k", jpeg(), "  a  red\tsquare ", source="unit")
    assert not isinstance(pair, Rejected)
    assert (pair["width"], pair["height"], pair["caption"]) == (20, 10, "a red square")
    assert len(pair["sha256"]) == 64


def test_truncated_jpeg_is_undecodable():
    result = image_size(jpeg((64, 64))[:200])
    assert isinstance(result, Rejected) and result.reason == Reason.UNDECODABLE_IMAGE


def test_random_bytes_and_empty_image():
    assert image_size(b"not an image at all").reason == Reason.UNDECODABLE_IMAGE
    assert image_size(b"").reason == Reason.EMPTY_IMAGE
    assert image_size(None).reason == Reason.EMPTY_IMAGE


def test_decompression_bomb_is_rejected_without_decoding():
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, format="PNG")
    result = image_size(out.getvalue())
    assert isinstance(result, Rejected) and result.reason == Reason.IMAGE_TOO_LARGE


def test_caption_rejects():
    assert clean_caption(None).reason == Reason.EMPTY_CAPTION
    assert clean_caption(" \n\t ").reason == Reason.EMPTY_CAPTION
    assert clean_caption(b"caf\xe9").reason == Reason.NON_UTF8_CAPTION
    assert clean_caption("x" * 101, max_chars=100).reason == Reason.CAPTION_TOO_LONG
    assert clean_caption("café 🔥".encode()) == "café 🔥"


def test_a_quarter_turned_photo_reports_its_upright_size():
    """Ingest reported the stored 48x40 of a photo its EXIF turns upright to 40x48, the size every later
    stage and the trainer see."""
    for orientation, size in ((1, (48, 40)), (3, (48, 40)), (6, (40, 48)), (8, (40, 48))):
        image = Image.new("RGB", (48, 40), (200, 0, 0))
        exif = image.getexif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", exif=exif.tobytes())
        assert image_size(buffer.getvalue()) == size, orientation
