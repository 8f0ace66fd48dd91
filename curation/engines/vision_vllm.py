"""The `vllm` captioner: offline multimodal generation with `LLM.chat` (or `LLM.generate`).

Beam's own vLLM handler is text-only, so the caption stage calls vLLM here.
Memory is bounded on two sides: `limit_mm_per_prompt={"image": 1}` tells the
engine to plan for one image per request, and `max_pixels` (passed to the
model's processor, e.g. Qwen2-VL's dynamic resolution) caps the visual tokens
a single large image can turn into. Images are also capped by
curation.images before they get here.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from curation.engines.base import Generation, SamplingParams, check_paired

DEFAULT_MAX_PIXELS = 768 * 768


class VLLMVisionEngine:
    """VisionEngine over `vllm.LLM` with one image per request."""

    def __init__(self, model: str, *, dtype: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
                 prompt_mode: str = "chat", max_model_len: int = 4096, max_num_seqs: int | None = None,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1,
                 enable_prefix_caching: bool = True, trust_remote_code: bool = False, seed: int = 0,
                 extra_engine_args: dict | None = None):
        from vllm import LLM

        if prompt_mode not in ("chat", "plain"):
            raise ValueError(f"prompt_mode must be chat or plain for vllm, got {prompt_mode!r}")
        args = dict(model=model, dtype=dtype, limit_mm_per_prompt={"image": 1},
                    mm_processor_kwargs={"max_pixels": max_pixels} if max_pixels else None,
                    max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                    tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=enable_prefix_caching,
                    trust_remote_code=trust_remote_code, seed=seed)
        if max_num_seqs:
            args["max_num_seqs"] = max_num_seqs
        args.update(extra_engine_args or {})
        self.llm = LLM(**{k: v for k, v in args.items() if v is not None})
        self.prompt_mode = prompt_mode
        self.name = f"vllm:{model}"

    def caption(self, images: Sequence[Image.Image], prompt: str, params: Sequence[SamplingParams]) -> list[Generation]:
        from vllm import SamplingParams as VLLMSampling

        check_paired(images, params, "images")
        if not images:
            return []
        sampling = [VLLMSampling(max_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed)
                    for p in params]
        if self.prompt_mode == "chat":
            conversations = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                           {"type": "text", "text": prompt}]}] for image in images]
            outputs = self.llm.chat(conversations, sampling_params=sampling, use_tqdm=False)
        else:
            requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]
            outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        return [Generation(text=out.outputs[0].text.strip(), prompt_tokens=len(out.prompt_token_ids or []),
                           completion_tokens=len(out.outputs[0].token_ids)) for out in outputs]
