"""The `openai` backend: any OpenAI-compatible completions server, such as `vllm serve`.

A server batches the requests in flight, not serial ones, so requests go out
concurrently from a thread pool. Each request has a timeout and is retried
with backoff; a request that still fails raises, and the stage's recovery
(curation.engines.recovery) decides what happens next. Prompts arrive already
formatted; chat prompts are formatted with the model's tokenizer, loaded
locally from `tokenizer` (default: the model name, if it is a local folder).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from curation.engines.base import Generation, SamplingParams, check_paired


class OpenAIEngine:
    """TextEngine over the /v1/completions endpoint of an OpenAI-compatible server."""

    def __init__(self, model: str, *, base_url: str = "http://127.0.0.1:8000/v1", api_key: str | None = None,
                 concurrency: int = 64, timeout: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
                 tokenizer: str | None = None):
        from openai import OpenAI

        self.model, self.retries, self.backoff_s, self.concurrency = model, retries, backoff_s, concurrency
        # The key comes from OPENAI_API_KEY unless given; local servers accept any.
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             timeout=timeout, max_retries=0)
        self.name = f"openai:{base_url}:{model}"
        self._tokenizer_name = tokenizer or model
        self._tokenizer = None

    def _tok(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
        return self._tokenizer

    @property
    def has_chat_template(self) -> bool:
        try:
            return bool(getattr(self._tok(), "chat_template", None))
        except (OSError, ValueError):
            return False  # no local tokenizer: completion prompts only

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self._tok().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self._tok().encode(t, add_special_tokens=False)) for t in texts]

    @property
    def special_tokens(self) -> list[str]:
        try:
            return list(self._tok().all_special_tokens)
        except (OSError, ValueError):
            return []

    def _one(self, prompt: str, params: SamplingParams, stop: Sequence[str]) -> Generation:
        for attempt in range(self.retries + 1):
            try:
                response = self.client.completions.create(
                    model=self.model, prompt=prompt, max_tokens=params.max_new_tokens, temperature=params.temperature,
                    top_p=params.top_p, seed=params.seed, stop=list(stop) or None)
                usage = response.usage
                return Generation(text=response.choices[0].text,
                                  prompt_tokens=usage.prompt_tokens if usage else 0,
                                  completion_tokens=usage.completion_tokens if usage else 0)
            except Exception:  # noqa: BLE001 - connection, timeout, 5xx: retried, then raised
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams],
                 stop: Sequence[str] = ()) -> list[Generation]:
        check_paired(prompts, params)
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda pair: self._one(pair[0], pair[1], stop), zip(prompts, params)))
