"""A LLaVA-architecture VLM with random weights, built from a config, for tests, the demo and benchmarks.

No captioning model can be downloaded offline, so this builds one locally:
a CLIP vision tower, a Llama language model, a word-level tokenizer trained
here on a common-English word list, a PIL image processor and a chat
template, all saved with `save_pretrained`. It then loads through the same
`AutoProcessor` / `AutoModelForImageTextToText` path as a real model.
Its captions are random words: it exercises the machinery, nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

# Marker written beside the weights, so every stage can tell a random model from a trained one.
RANDOM_MODEL_MARKER = "RANDOM_WEIGHTS.json"

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# (vision hidden, vision layers, image side, patch, text hidden, text layers, heads, vocabulary words)
SIZES: dict[str, dict[str, int]] = {
    # Seconds to build, milliseconds per caption: for tests and the demo.
    "tiny": dict(v_hidden=32, v_layers=2, image=32, patch=8, t_hidden=64, t_layers=2, heads=4, words=3000),
    # About LLaVA's shape at a small scale: ViT-B/16 at 224 px (196 image tokens) and a ~135M-parameter LM.
    "base": dict(v_hidden=768, v_layers=12, image=224, patch=16, t_hidden=576, t_layers=30, heads=9, words=20000),
}


def is_random_model(path: str | Path) -> bool:
    """True when `path` is a model folder this module built (random weights)."""
    return (Path(path) / RANDOM_MODEL_MARKER).is_file()


def build_tiny_vlm(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build and save a random-weight LLaVA-style VLM with its processor under `path`; return the path."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    dims = SIZES[size]
    path = Path(path)
    tokenizer = _train_tokenizer(dims["words"])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": dims["image"]},
                                            crop_size={"height": dims["image"], "width": dims["image"]})
    # CLIP's vision tower adds a CLS token that LLaVA's "default" feature strategy drops again.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=dims["patch"],
                               num_additional_image_tokens=1, vision_feature_select_strategy="default",
                               chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=dims["v_hidden"], intermediate_size=4 * dims["v_hidden"],
                              num_hidden_layers=dims["v_layers"], num_attention_heads=max(2, dims["v_hidden"] // 64),
                              image_size=dims["image"], patch_size=dims["patch"])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=dims["t_hidden"],
                       intermediate_size=dims["t_hidden"] * 8 // 3,
                       num_hidden_layers=dims["t_layers"], num_attention_heads=dims["heads"],
                       num_key_value_heads=max(1, dims["heads"] // 3), max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    return _save_random(LlavaForConditionalGeneration, config, processor, tokenizer, path, seed, size)


def _train_tokenizer(words: int, image_token_attribute: bool = True):
    """A word-level tokenizer trained here on the most frequent English words (wordfreq).

    `image_token_attribute` names "<image>" as the tokenizer's image token (LLaVA's processor reads it);
    BLIP-2's processor registers the token itself and breaks on a plain-string attribute.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from wordfreq import top_n_list

    vocabulary = top_n_list("en", words)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    tokenizer.train_from_iterator([" ".join(vocabulary)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left",
                                   **({"extra_special_tokens": {"image_token": "<image>"}}
                                      if image_token_attribute else {}))


def build_tiny_blip2(path: str | Path, seed: int = 0) -> Path:
    """A random-weight BLIP-2 (ViT, Q-Former, OPT) with its processor: the caption-only family ("none" prompts).

    Its attention heads are 64 wide, so vLLM's CPU kernels accept it too.
    """
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, OPTConfig)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    path = Path(path)
    tokenizer = _train_tokenizer(SIZES["tiny"]["words"], image_token_attribute=False)
    queries = 8
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=queries)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, image_size=32, patch_size=8),
        qformer_config=Blip2QFormerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=1, encoder_hidden_size=64),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                              num_attention_heads=2, word_embed_proj_dim=128, max_position_embeddings=512,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=queries, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    return _save_random(Blip2ForConditionalGeneration, config, processor, tokenizer, path, seed, "blip2-tiny")


def _save_random(model_class, config, processor, tokenizer, path: Path, seed: int, size: str) -> Path:
    """The model built from `config` with seeded random weights, saved with its processor and
    RANDOM_MODEL_MARKER, so that `from_pretrained` loads it as users load theirs, and the demo says what it is."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / RANDOM_MODEL_MARKER).write_text(json.dumps(
        {"size": size, "seed": seed, "note": "random weights built from a config; captions are meaningless"}))
    return path
