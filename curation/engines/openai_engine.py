"""The `openai` backend: any OpenAI-compatible completions server, such as `vllm serve`.

A server batches the requests in flight, not serial ones, so requests go out
concurrently from a thread pool. Retries live in one place, the openai
client: each request has a timeout and is retried `retries` times with the
client's backoff (connection errors, timeouts, 429 and 5xx), and the stage's
recovery (curation.engines.recovery) does not retry this engine again. A call
carries every request of a stage's batch, so one request that fails for good
raises RequestsFailed naming it and counting the others: the run stops there
(its finished shards are kept), so requests not yet sent are dropped, while
those in flight finish.

Prompts arrive already formatted; chat prompts are formatted with the model's
tokenizer, loaded locally from `tokenizer` (default: the model name, if it is
a local folder). With that tokenizer here, requests carry token ids, not
text: the server then runs exactly the tokens the vllm and transformers
engines would (ChatTokenizer.prompt_ids), where a server tokenizing the text
itself would add a second BOS after a chat template's own. Without one, or
with `token_ids=False` for a server that takes text only, the text goes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from curation.engines.base import ChatTokenizer, Generation, SamplingParams, check_paired, not_sent, send_concurrently


class RequestsFailed(RuntimeError):
    """Requests of one call failed after the client's retries; `failed` holds their indices in the call."""

    def __init__(self, prompts: Sequence[str], failed: list[int], not_sent: int, first: BaseException):
        self.failed, self.not_sent = failed, not_sent
        dropped = f", {not_sent} not sent" if not_sent else ""
        super().__init__(f"{len(failed)} of {len(prompts)} requests failed{dropped}; first: request {failed[0]} "
                         f"(prompt ending {prompts[failed[0]][-60:]!r}): {type(first).__name__}: {first}")


class OpenAIEngine(ChatTokenizer):
    """TextEngine over the /v1/completions endpoint of an OpenAI-compatible server."""

    # Each request is retried by the client; retrying the whole batch again would multiply the attempts.
    retries_requests = True

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 concurrency: int = 64, timeout: float = 120.0, retries: int = 3, tokenizer: str | None = None,
                 token_ids: bool = True, api_key_env: str = "OPENAI_API_KEY"):
        from openai import OpenAI

        self.model, self.concurrency, self.token_ids = model, concurrency, token_ids
        # As the vision engine and the resource check read it: the option, else OPENAI_BASE_URL, else local.
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1"
        # The key comes from the environment unless given (local servers accept any): OPENAI_API_KEY, or the
        # variable `api_key_env` names, so that a stage's second endpoint (fusion) need not share its key.
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get(api_key_env) or "EMPTY",
                             timeout=timeout, max_retries=retries)
        self.name = f"openai:{base_url}:{model}"
        self._tokenizer_name = tokenizer or model
        self._tokenizer: Any = None
        self._tokenizer_error: Exception | None = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, read locally once; OSError if there is none here (completion prompts only)."""
        if self._tokenizer is None and self._tokenizer_error is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
            except (OSError, ValueError) as exc:
                self._tokenizer_error = exc
        if self._tokenizer_error is not None:
            raise OSError(f"no local tokenizer for {self._tokenizer_name!r}") from self._tokenizer_error
        return self._tokenizer

    def preferred_requests_per_call(self, prompt_tokens: int, new_tokens: int) -> None:
        """All of them: the pool keeps `concurrency` in flight and the server batches those."""
        return None

    def _payloads(self, prompts: Sequence[str]) -> Sequence[str | list[int]]:
        """What each request sends as its prompt: token ids where a local tokenizer makes them, else text."""
        if self.token_ids:
            try:
                return self.prompt_ids(prompts)
            except OSError:
                pass  # no tokenizer here: the server tokenizes
        return prompts

    def _one(self, prompt: str | list[int], params: SamplingParams, stop: Sequence[str]) -> Generation:
        response = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=params.seed, stop=list(stop) or None)
        usage = response.usage
        details = getattr(usage, "prompt_tokens_details", None)
        return Generation(text=response.choices[0].text, prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=usage.completion_tokens if usage else 0,
                          cached_tokens=int(getattr(details, "cached_tokens", 0) or 0))

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams],
                 stop: Sequence[str] = ()) -> list[Generation]:
        check_paired(prompts, params)
        if not prompts:
            return []
        requests = [(prompt, p, stop) for prompt, p in zip(self._payloads(prompts), params)]
        futures = send_concurrently(self._one, requests, self.concurrency)
        failed = [i for i, f in enumerate(futures) if not not_sent(f) and f.exception() is not None]
        if failed:
            first = futures[failed[0]].exception()
            raise RequestsFailed(prompts, failed, sum(map(not_sent, futures)), first) from first
        return [f.result() for f in futures]
