"""The two small interfaces every LLM or VLM stage talks to.

Rewrite, caption and fusion all go through these, so a backend (transformers,
vLLM, an OpenAI-compatible server) is chosen by configuration, never by code
in a stage.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from PIL import Image


def prompt_sha256(prompts: Sequence[str | list[dict[str, str]]]) -> str:
    """sha256 of a stage's prompts laid out around placeholder inputs (completion texts and chat message
    lists). Recorded in the stage config beside the prompt version, so an edit of the wording or the layout
    that forgot to bump the version still cannot resume into an output written with the old prompts."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one request; `seed` makes the request reproducible."""

    max_new_tokens: int = 64
    temperature: float = 0.9
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Generation:
    """One output text with its token counts, for throughput and prefix-cache accounting.

    `cached_tokens` are the prompt tokens the engine served from a cached
    prefix instead of computing them (as measured by the engine; 0 if it cannot tell).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


def check_paired(inputs: Sequence, params: Sequence[SamplingParams], what: str = "prompts") -> None:
    """Every engine takes one SamplingParams per input; a length mismatch is a caller bug, caught up front."""
    if len(inputs) != len(params):
        raise ValueError(f"{len(inputs)} {what} but {len(params)} sampling params")


T = TypeVar("T")


class NotSent(RuntimeError):
    """A request `send_concurrently` did not send: another had already failed for good."""


def send_concurrently(send: Callable[..., T], requests: Sequence[tuple], concurrency: int) -> list[Future]:
    """`send(*request)` for every request, `concurrency` at a time (a server batches the requests in flight,
    not serial ones); once one fails, none more is sent, and those in flight finish. Each future holds a
    result, the request's own error, or NotSent.

    The stop is decided in the worker that saw the failure, before it takes its next request: after a
    cancellation from the caller's thread, a worker could already have sent one or two more.
    """
    failed = threading.Event()

    def guarded(*request):
        if failed.is_set():
            raise NotSent
        try:
            return send(*request)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(requests))))
    try:
        futures = [pool.submit(guarded, *request) for request in requests]
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:  # an interrupt too: nothing queued is sent
        failed.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return futures


class CaptionsFailed(RuntimeError):
    """Some images of a captioning call failed for good; `results` holds the captions that came back (None for
    the others), `failed` the indices whose request failed itself (the rest of the Nones were not sent)."""

    def __init__(self, results: list[Generation | None], failed: list[int], first: BaseException):
        self.results, self.failed = results, failed
        super().__init__(f"{len(failed)} of {len(results)} images failed, {results.count(None) - len(failed)} not "
                         f"sent; first: image {failed[0]}: {type(first).__name__}: {first}")


def not_sent(future: Future) -> bool:
    return future.cancelled() or isinstance(future.exception(), NotSent)


@runtime_checkable
class TextEngine(Protocol):
    """Generates one completion per prompt. Prompts are already formatted (chat template or completion).

    Engines may also offer `preferred_requests_per_call(prompt_tokens,
    new_tokens) -> int | None`: how many requests one `generate` call should
    carry to keep the hardware busy (None: as many as there are). Only an
    engine whose answer depends on the prompt length says so with a true
    `sizes_by_prompt_length`; the others are passed 0, so callers need not
    tokenize anything to ask.
    """

    name: str

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[Generation]: ...


# The date a chat template that prints one is given (Llama 3's own default).
TEMPLATE_DATE = "26 Jul 2024"


class ChatTokenizer:
    """Chat formatting and token counting over a Hugging Face tokenizer at `self.tokenizer`.

    Shared by the text engines, so a prompt is laid out and counted the same
    way whichever backend runs it. An engine whose tokenizer may be missing
    (a remote server's model) raises OSError or ValueError from `tokenizer`:
    then it has no chat template and no special tokens.
    """

    tokenizer: Any

    @property
    def has_chat_template(self) -> bool:
        try:
            return bool(getattr(self.tokenizer, "chat_template", None))
        except (OSError, ValueError):
            return False

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template, ending with the assistant's turn opened.

        A template with no system role (Gemma, early Mistral: they raise on one) gets the system text at
        the head of the first user turn. Templates that print today's date (Llama 3) get a fixed one, so a
        prompt, and a prefix-cached group of them, is the same whatever day the stage runs.
        """
        from jinja2.exceptions import TemplateError

        def render(turns: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True,
                                                      date_string=TEMPLATE_DATE)

        try:
            return render(messages)
        except TemplateError:
            if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
                raise
            system, first, *rest = messages
            return render([{**first, "content": f"{system['content']}\n\n{first['content']}"}, *rest])

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """The token ids every local backend feeds the model for these prompts, so that they all see the same.

        A prompt is tokenized as text (a chat template's own markup, BOS included, stays as written), and
        starts with BOS when the tokenizer would add one and the text has none: a base model's completion
        prompt gets its BOS, and a chat template that writes BOS itself never gets a second.
        """
        rows = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a")["input_ids"]
        if bos is None or not probe or probe[0] != bos:
            return rows
        return [row if row[:1] == [bos] else [bos, *row] for row in rows]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    @property
    def special_tokens(self) -> list[str]:
        """Every special or added token: markup a caption must not smuggle into a prompt."""
        try:
            tokenizer = self.tokenizer
        except (OSError, ValueError):
            return []
        added = getattr(tokenizer, "get_added_vocab", dict)()
        return list(dict.fromkeys([*getattr(tokenizer, "all_special_tokens", []), *map(str, added)]))


@runtime_checkable
class VisionEngine(Protocol):
    """Generates one caption per image for a shared instruction prompt.

    A call that fails may raise CaptionsFailed, holding the captions it did finish, so that the caller asks
    again only for the others.
    """

    name: str

    def caption(self, images: Sequence[Image.Image], prompt: str, params: Sequence[SamplingParams]) -> list[Generation]: ...


def eos_ids(generation_config, tokenizer=None) -> set[int]:
    """Every token id that ends a generation: the generation config's, and the tokenizer's when there is one."""
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The generated tokens up to (not including) the first end-of-sequence token."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens
