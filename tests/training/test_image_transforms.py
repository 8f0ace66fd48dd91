"""Evaluation preprocessing is CLIPImageProcessor's, so the saved model sees the same pixels wherever it loads."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from training.image_transforms import eval_transform, image_processor_config, normalise


@pytest.mark.parametrize("size", [32, 64, 224])
def test_eval_transform_is_clip_image_processor_pixel_for_pixel(size):
    """Odd aspect ratios are where a rounded longer side (96 for 100x67 at 64 px, against HF's 95) shifted
    the centre crop by a pixel: up to 3.0 apart in normalised units on noise images."""
    settings = {k: v for k, v in image_processor_config(size).items() if k != "image_processor_type"}
    processor = CLIPImageProcessor(**settings)
    rng = np.random.default_rng(size)
    for width, height in [(100, 67), (67, 100), (50, 50), (33, 120), (640, 480), (301, 199)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours = normalise(eval_transform(image, size)[None])
        theirs = processor(images=[image], return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, size, size)
        assert torch.allclose(ours, theirs, atol=1e-5), (width, height, float((ours - theirs).abs().max()))


def test_normalisation_is_openai_clips():
    """The processor config is built from these constants too: a test against it alone could not see them change."""
    config = image_processor_config(224)
    assert config["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert config["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])


def test_decode_turns_a_photo_upright_by_its_exif_orientation():
    """The caption stage turned it for the VLM; the trainer trained on it sideways."""
    import io

    from training.image_transforms import decode

    stored = Image.new("RGB", (48, 40), (0, 0, 200))
    stored.paste((200, 0, 0), (0, 0, 8, 40))  # a red band down the stored image's left edge
    exif = stored.getexif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the band runs along the top
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    upright = decode(buffer.getvalue())
    assert upright.size == (40, 48)
    assert upright.getpixel((20, 2))[0] > 150 and upright.getpixel((20, 45))[2] > 150
