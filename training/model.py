"""transformers' CLIPModel in three sizes, and the two-tower view the training step uses.

`tiny` trains on a laptop CPU in minutes (the tests and the demo use it);
`vit-b-32` and `vit-b-16` match open_clip's ViT-B-32 / ViT-B-16 shapes (GELU,
width 768 / 512, 12 layers each) for GPU runs. The logit scale starts at
ln(1/0.07), as in CLIP and open_clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from training.optim import QuantConfig, quantize_model

# The towers' output heads: left out of 4-bit training.
PROJECTIONS = ("visual_projection", "text_projection")

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass(frozen=True)
class Preset:
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    vocab_size: int
    embed_dim: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 8, 128, 3, 4, 128, 3, 4, 32, 2048, 128),
    "vit-b-32": Preset(224, 32, 768, 12, 12, 512, 12, 8, 77, 49408, 512),
    "vit-b-16": Preset(224, 16, 768, 12, 12, 512, 12, 8, 77, 49408, 512),
}


def clip_config(preset: str, *, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                image_size: int = 0, context_length: int = 0) -> CLIPConfig:
    """A CLIPConfig for a preset, sized to the tokenizer; image_size/context_length 0 keep the preset's."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    text = dict(vocab_size=vocab_size, hidden_size=p.text_width, intermediate_size=4 * p.text_width,
                num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
                max_position_embeddings=context_length or p.context_length, hidden_act="gelu",
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, projection_dim=p.embed_dim)
    vision = dict(hidden_size=p.vision_width, intermediate_size=4 * p.vision_width, num_hidden_layers=p.vision_layers,
                  num_attention_heads=p.vision_heads, image_size=image_size or p.image_size, patch_size=p.patch_size,
                  hidden_act="gelu", projection_dim=p.embed_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=p.embed_dim,
                      logit_scale_init_value=LOGIT_SCALE_INIT)


def build_model(config: CLIPConfig, seed: int, quantize: str = "none") -> CLIPModel:
    """A freshly initialised CLIPModel; the seed fixes the initial weights.

    `quantize` (int4, fp4_e2m1, fp4_e1m2) fake-quantizes the weights and activations of both towers' linear
    layers in the forward pass, as Stable-SPAM's 4-bit training does (training.optim.quantize_model). The
    projections stay in full precision, as the paper leaves a model's output head; patch and token
    embeddings are no linear layers. The parameters stay the full-precision master weights, so checkpoints
    and `save_pretrained` hold a plain CLIPModel's.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    if quantize != "none":
        quantize_model(model, QuantConfig(weight_format=quantize, act_format=quantize, exclude=PROJECTIONS))
    return model


class ClipTowers(nn.Module):
    """Normalised image and text features plus the logit scale: what the contrastive loss needs.

    The training step calls this (wrapped in DDP when distributed) instead of
    CLIPModel.forward, so each rank gets its local features and the loss can
    gather them across ranks.
    """

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        text = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1), self.model.logit_scale.exp().float()


def clamp_logit_scale(model: CLIPModel) -> None:
    """Keep the log scale in [0, ln 100] after every optimizer step, as CLIP and open_clip do."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


@torch.no_grad()
def encode_images(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)


@torch.no_grad()
def encode_texts(model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    features = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return F.normalize(features.float(), dim=-1)
