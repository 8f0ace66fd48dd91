"""CLIP image preprocessing with PIL and torch only (torchvision would pull a CUDA torch).

Training: a random resized crop (area share in [scale_min, 1], aspect ratio in
[3/4, 4/3], ten tries then a centre crop), resized bicubically to the model's
size. Evaluation: the shorter side resized to the size, then a centre crop,
as CLIPImageProcessor does. Crop parameters come from a hash of (seed, key,
epoch), so a resumed run crops the same way.

Both transforms return uint8 CHW tensors: a DataLoader worker sends a quarter
of the bytes float32 would take through shared memory and the host-to-device
copy. `normalise` (CLIP's mean and std) runs where the batch is going, on the
GPU in training, and is the one normalisation every path uses.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from curation.images import to_rgb
from training.randomness import unit_uniform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


class CorruptImage(ValueError):
    """Image bytes that Pillow cannot decode fully."""


def decode(data: bytes | None) -> Image.Image:
    """Upright RGB image from encoded bytes; a truncated or unreadable image raises CorruptImage.

    Upright: turned by its EXIF orientation, and transparent pixels on white, as the caption stage prepares it
    for the VLM: a phone photo does not train sideways, nor a logo on black, against a caption of the other."""
    if not data:
        raise CorruptImage("no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as exc:  # Pillow raises many types for broken data; all mean the same here.
        raise CorruptImage(f"{type(exc).__name__}: {exc}"[:200]) from exc


def to_tensor(image: Image.Image) -> torch.Tensor:
    """CHW uint8 tensor of an RGB image (not normalised: see `normalise`)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) pixels to float32 normalised with CLIP's mean and std, on the pixels' device.

    The per-channel constants are made once per device: building them for
    every batch would be a host-to-device copy per step.
    """
    if pixels.device not in _CONSTANTS:
        scale = torch.tensor([1 / (255.0 * s) for s in CLIP_STD], device=pixels.device).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], device=pixels.device).view(1, 3, 1, 1)
        _CONSTANTS[pixels.device] = scale, shift
    scale, shift = _CONSTANTS[pixels.device]
    return torch.addcmul(shift, pixels.float(), scale)


def crop_box(width: int, height: int, scale_min: float, *parts: object) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random resized crop drawn from the hash of `parts`."""
    area = width * height
    for attempt in range(10):
        target = area * (scale_min + (1.0 - scale_min) * unit_uniform(*parts, attempt, "area"))
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * unit_uniform(*parts, attempt, "ratio")
        ratio = math.exp(log_ratio)
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(unit_uniform(*parts, attempt, "x") * (width - w + 1))
            top = int(unit_uniform(*parts, attempt, "y") * (height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def train_transform(image: Image.Image, size: int, scale_min: float, *parts: object) -> torch.Tensor:
    box = crop_box(image.width, image.height, scale_min, *parts)
    return to_tensor(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Shorter side to `size` (bicubic), then a centre crop of size x size: pixel for pixel what
    CLIPImageProcessor does with `image_processor_config(size)`, so the saved model sees the same images
    anywhere (its longer side is truncated, int(size * long / short), not rounded)."""
    short, long = sorted((image.width, image.height))
    other = int(size * long / short)
    width, height = (size, other) if image.width <= image.height else (other, size)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return to_tensor(image.crop((left, top, left + size, top + size)))


def image_processor_config(size: int) -> dict:
    """A preprocessor_config.json that makes CLIPImageProcessor preprocess as eval_transform does."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }
