"""The `transformers` captioner: batched `generate` over images with `AutoProcessor`.

Covers the families behind `AutoModelForImageTextToText` (BLIP, BLIP-2,
LLaVA and LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma,
...). How the instruction reaches the model depends on the family, set by
`prompt_mode`:

- "chat": the processor's chat template with an image part and a text part
  (LLaVA, Qwen2-VL, SmolVLM: instruction-following models);
- "plain": the prompt as a text prefix (PaliGemma's "caption en", BLIP's
  conditional captioning);
- "none": the image alone (BLIP's unconditional captioning; an instruction
  would only be continued, not followed).

"auto" picks chat when the processor has a chat template, none for
BLIP-type captioners, plain otherwise. Rows are sampled with their own seed
(curation.engines.seeding), so a caption does not depend on its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PIL import Image

from curation.engines.base import Generation, SamplingParams, check_paired, eos_ids, until_eos
from curation.engines.seeding import SeededSampler, drop_checkpoint_decoding, request_seeds

log = logging.getLogger(__name__)

PROMPT_MODES = ("auto", "chat", "plain", "none")
CAPTION_ONLY_MODELS = ("blip", "blip-2", "vision-encoder-decoder")
CPU_BATCH = 8
GPU_BATCH = 64


def _model_class():
    """AutoModelForImageTextToText; older transformers only had AutoModelForVision2Seq for some families."""
    import transformers

    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ImportError("this transformers has neither AutoModelForImageTextToText nor AutoModelForVision2Seq")


class TransformersVisionEngine:
    """VisionEngine over a VLM loaded with `from_pretrained` (hub id or local folder)."""

    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None, batch_size: int | None = None,
                 prompt_mode: str = "auto", max_pixels: int | None = None, cpu_threads: int | None = None,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoProcessor

        if cpu_threads:
            # Process-wide: on a busy CPU, fewer threads than cores avoids OpenMP spin-wait stalls.
            torch.set_num_threads(cpu_threads)

        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt_mode {prompt_mode!r}; choose one of {', '.join(PROMPT_MODES)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                       "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        extra = {"max_pixels": max_pixels} if max_pixels else {}  # Qwen2-VL-family: caps visual tokens per image
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code, **extra)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only VLMs generate after the prompt: pad on the left
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.model = _model_class().from_pretrained(model, dtype=torch_dtype,
                                                    trust_remote_code=trust_remote_code).to(self.device).eval()
        model_type = getattr(self.model.config, "model_type", "")
        if prompt_mode == "auto":
            prompt_mode = ("chat" if getattr(self.processor, "chat_template", None)
                           else "none" if model_type in CAPTION_ONLY_MODELS else "plain")
        self.prompt_mode = prompt_mode
        self.batch_size = batch_size or (GPU_BATCH if self.device.type == "cuda" else CPU_BATCH)
        self.name = f"transformers:{model}"
        if dropped := drop_checkpoint_decoding(self.model.generation_config):
            log.warning("%s: ignoring its generation_config's %s; captions follow the stage's sampling settings "
                        "alone, as on vLLM", self.name, dropped)

    def format_prompt(self, prompt: str) -> str | None:
        """The text the processor gets for one image, or None for image-only captioning."""
        if self.prompt_mode == "none":
            return None
        if self.prompt_mode == "plain":
            return prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def caption(self, images: Sequence[Image.Image], prompt: str, params: Sequence[SamplingParams]) -> list[Generation]:
        check_paired(images, params, "images")
        text = self.format_prompt(prompt)
        results: list[Generation] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            results += self._caption_batch(list(images[start:stop]), text, list(params[start:stop]))
        return results

    def _caption_batch(self, images: list[Image.Image], text: str | None,
                       params: list[SamplingParams]) -> list[Generation]:
        import torch
        from transformers import LogitsProcessorList

        if not images:
            return []
        # Image-only captioning still sends an empty text, so the processor lays out the image tokens
        # and BOS itself and the output can be split into prompt and continuation the same way.
        kwargs = {"images": images, "return_tensors": "pt", "text": [text or ""] * len(images), "padding": True}
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        max_new = max(p.max_new_tokens for p in params)
        sampler = SeededSampler(request_seeds([p.seed for p in params]), [p.temperature for p in params],
                                [p.top_p for p in params], max_new)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new,
                                      do_sample=False, temperature=None, top_p=None, top_k=None,
                                      logits_processor=LogitsProcessorList([sampler]), pad_token_id=pad_id)
        prompt_ids = inputs.get("input_ids")
        # Decoder-only models return prompt + continuation; encoder-decoders return the continuation only.
        if prompt_ids is not None and out.shape[1] > prompt_ids.shape[1] and torch.equal(
                out[:, :prompt_ids.shape[1]].cpu(), prompt_ids.cpu()):
            new = out[:, prompt_ids.shape[1]:]
            prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        else:
            new = out
            prompt_tokens = [0] * len(images)
        eos = eos_ids(self.model.generation_config, self.tokenizer)
        results = []
        for row, p, n_prompt in zip(new.tolist(), params, prompt_tokens):
            tokens = until_eos(row[:p.max_new_tokens], eos)
            caption = self.processor.decode(tokens, skip_special_tokens=True).strip()
            results.append(Generation(text=caption, prompt_tokens=int(n_prompt), completion_tokens=len(tokens)))
        return results

