"""A tiny Llama-shaped chat model for tests: tokenizer trained here, random weights, saved with save_pretrained.

Tests load it back through the same `from_pretrained` path users run, so
nothing is fetched from a hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "a red circle on a plain background", "two blue squares", "three green triangles on white",
    "a photo of four yellow stars", "purple hexagon icon", "orange diamonds, flat illustration",
    "a black dog on the beach", "a white mug on a wooden table", "some rings", "a brown horse in a field",
    "rewrite image captions in other words", "Each image caption below is followed by a fresh rewording of it:",
] * 20


def build_tiny_chat_model(path: Path, seed: int = 0, with_chat_template: bool = True, hidden_size: int = 32,
                          heads: int = 4) -> Path:
    """Train a byte-level BPE tokenizer on CORPUS, build a 2-layer Llama, save both under `path`.

    vLLM's CPU attention wants a common head size: use hidden_size=128, heads=2 (head size 64) there.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    if with_chat_template:
        fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=512,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                         bos_token_id=fast.bos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny chat model, saved once per session (import this fixture into a test module to use it)."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_llm"))
