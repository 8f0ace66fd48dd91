"""The `openai` captioner: an OpenAI-compatible server (vLLM serve, SGLang, TGI, a hosted API).

Each image goes inline as a `data:image/jpeg;base64,...` URL in an
`image_url` content part, so the server needs no access to our storage.
Requests run concurrently in threads; the server does the batching.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence

from PIL import Image

from curation.engines.base import (CaptionsFailed, Generation, SamplingParams, check_paired, not_sent,
                                   send_concurrently)


def data_uri(image: Image.Image, quality: int = 90) -> str:
    """The image as an inline JPEG data URI (RGB; the caption stage has already converted it)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIVisionEngine:
    """VisionEngine over the chat-completions endpoint of an OpenAI-compatible server."""

    # The client retries each request (with backoff): the captioner calls it once per batch, not again.
    retries_requests = True

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 120.0, retries: int = 2, jpeg_quality: int = 90):
        from openai import OpenAI

        # As the text engine: the option, else OPENAI_BASE_URL, else a local server. Never a hosted API by
        # default: the images would leave the cluster.
        self.client = OpenAI(base_url=base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1",
                             api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             timeout=timeout, max_retries=retries)
        self.model, self.concurrency, self.jpeg_quality = model, max(1, concurrency), jpeg_quality
        self.name = f"openai:{model}@{self.client.base_url}"

    def _one(self, image: Image.Image, prompt: str, params: SamplingParams) -> Generation:
        content = [{"type": "image_url", "image_url": {"url": data_uri(image, self.jpeg_quality)}},
                   {"type": "text", "text": prompt}]
        extra = {"seed": params.seed} if params.seed is not None else {}
        response = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], max_tokens=params.max_new_tokens,
            temperature=params.temperature, top_p=params.top_p, **extra)
        usage = response.usage
        return Generation(text=(response.choices[0].message.content or "").strip(),
                          prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                          completion_tokens=getattr(usage, "completion_tokens", 0) or 0)

    def caption(self, images: Sequence[Image.Image], prompt: str, params: Sequence[SamplingParams]) -> list[Generation]:
        check_paired(images, params, "images")
        if not images:
            return []
        # After a failure nothing more of this call is sent: a dead server costs one failed request, not one
        # per image. The captions that did come back go up with the error, so that only the others are asked
        # again: a request timing out in a batch of 64 costs its own caption, not 63 captions asked anew.
        futures = send_concurrently(self._one, [(image, prompt, p) for image, p in zip(images, params)],
                                    self.concurrency)
        failed = [i for i, f in enumerate(futures) if not not_sent(f) and f.exception() is not None]
        if failed:
            first = futures[failed[0]].exception()
            results = [None if not_sent(f) or f.exception() is not None else f.result() for f in futures]
            raise CaptionsFailed(results, failed, first) from first
        return [f.result() for f in futures]

    @staticmethod
    def unreachable(error: Exception) -> bool:
        """Whether the server could not be connected to (not an error about one image). A timeout is not:
        one large image may take too long while the server is fine."""
        from openai import APIConnectionError, APITimeoutError  # a timeout is a kind of connection error

        return isinstance(error, APIConnectionError) and not isinstance(error, APITimeoutError)
