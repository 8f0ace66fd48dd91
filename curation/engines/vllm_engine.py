"""The `vllm` backend: offline `vllm.LLM.generate` with one SamplingParams per request.

vLLM schedules the whole list itself (continuous batching up to
`max_num_seqs`), so the caller hands it every request at once; with prefix
caching on, prompts that share the rewrite stage's instruction and examples
compute that prefix once. vllm is imported only here: the CPU install never
needs it. Scripts that build this engine need an `if __name__ == "__main__":`
guard, because vLLM starts worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from curation.engines.base import Generation, SamplingParams, check_paired


class VLLMEngine:
    """TextEngine over `vllm.LLM`."""

    def __init__(self, model: str, *, gguf_file: str | None = None, dtype: str = "auto", tokenizer: str | None = None,
                 max_num_seqs: int = 256, gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 enable_prefix_caching: bool = True, max_model_len: int | None = 2048, seed: int = 0,
                 llm_kwargs: dict[str, Any] | None = None):
        from vllm import LLM

        path = os.path.join(model, gguf_file) if gguf_file else model
        self.llm = LLM(model=path, tokenizer=tokenizer, dtype=dtype, max_num_seqs=max_num_seqs,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len, seed=seed,
                       **(llm_kwargs or {}))
        self.tokenizer = self.llm.get_tokenizer()
        self.name = f"vllm:{path}"
        # Prompt tokens seen and those vLLM served from its prefix cache, for throughput reports.
        self.stats = {"prompt_tokens": 0, "prefix_reused_tokens": 0}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts]

    @property
    def special_tokens(self) -> list[str]:
        return list(getattr(self.tokenizer, "all_special_tokens", []))

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams],
                 stop: Sequence[str] = ()) -> list[Generation]:
        from vllm import SamplingParams as VSamplingParams

        check_paired(prompts, params)
        if not prompts:
            return []
        sampling = [VSamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens,
                                    seed=p.seed, stop=list(stop) or None) for p in params]
        outputs = self.llm.generate(list(prompts), sampling_params=sampling, use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            n_prompt = len(out.prompt_token_ids or [])
            self.stats["prompt_tokens"] += n_prompt
            self.stats["prefix_reused_tokens"] += int(getattr(out, "num_cached_tokens", 0) or 0)
            results.append(Generation(text=completion.text, prompt_tokens=n_prompt,
                                      completion_tokens=len(completion.token_ids)))
        return results
