"""The `vllm` backend: offline `vllm.LLM.generate` with one SamplingParams per request.

vLLM schedules the whole list itself (continuous batching up to
`max_num_seqs`, which by default vLLM picks from the hardware), so the caller
hands it every request at once; with prefix caching on, prompts that share
the rewrite stage's instruction and examples compute that prefix once, and
each output reports how many of its prompt tokens came from that cache. vllm
is imported only here: the CPU install never needs it. Scripts that build this
engine need an `if __name__ == "__main__":` guard, because vLLM starts worker
processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from curation.engines.base import ChatTokenizer, Generation, SamplingParams, check_paired


class VLLMEngine(ChatTokenizer):
    """TextEngine over `vllm.LLM`."""

    def __init__(self, model: str, *, gguf_file: str | None = None, dtype: str = "auto", tokenizer: str | None = None,
                 max_num_seqs: int | None = None, gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 enable_prefix_caching: bool = True, max_model_len: int | None = 2048, seed: int = 0,
                 llm_kwargs: dict[str, Any] | None = None):
        from vllm import LLM

        path = os.path.join(model, gguf_file) if gguf_file else model
        args = dict(model=path, tokenizer=tokenizer, dtype=dtype, max_num_seqs=max_num_seqs,
                    gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                    enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len, seed=seed)
        # An unset value is left out, so vLLM's own default (for max_num_seqs: by GPU size) applies.
        self.llm = LLM(**{k: v for k, v in args.items() if v is not None}, **(llm_kwargs or {}))
        self.tokenizer = self.llm.get_tokenizer()
        self.name = f"vllm:{path}"
        # Prompt tokens seen and those vLLM served from its prefix cache, for throughput reports.
        self.stats = {"prompt_tokens": 0, "prefix_reused_tokens": 0}

    def preferred_requests_per_call(self, prompt_tokens: int, new_tokens: int) -> None:
        """All of them: vLLM's scheduler keeps the GPU full from one long list."""
        return None

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams],
                 stop: Sequence[str] = ()) -> list[Generation]:
        from vllm import SamplingParams as VSamplingParams

        check_paired(prompts, params)
        if not prompts:
            return []
        sampling = [VSamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens,
                                    seed=p.seed, stop=list(stop) or None) for p in params]
        # Token ids, not text: vLLM would add BOS to text a chat template already began with one.
        tokens = [{"prompt_token_ids": ids} for ids in self.prompt_ids(prompts)]
        outputs = self.llm.generate(tokens, sampling_params=sampling, use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            n_prompt = len(out.prompt_token_ids or [])
            cached = int(getattr(out, "num_cached_tokens", 0) or 0)
            self.stats["prompt_tokens"] += n_prompt
            self.stats["prefix_reused_tokens"] += cached
            results.append(Generation(text=completion.text, prompt_tokens=n_prompt,
                                      completion_tokens=len(completion.token_ids), cached_tokens=cached))
        return results
