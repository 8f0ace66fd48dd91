"""The two small interfaces every LLM or VLM stage talks to.

Rewrite, caption and fusion all go through these, so a backend (transformers,
vLLM, an OpenAI-compatible server) is chosen by configuration, never by code
in a stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image


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
    """One output text with its token counts, for throughput and prefix-cache accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int


def check_paired(inputs: Sequence, params: Sequence[SamplingParams], what: str = "prompts") -> None:
    """Every engine takes one SamplingParams per input; a length mismatch is a caller bug, caught up front."""
    if len(inputs) != len(params):
        raise ValueError(f"{len(inputs)} {what} but {len(params)} sampling params")


@runtime_checkable
class TextEngine(Protocol):
    """Generates one completion per prompt. Prompts are already formatted (chat template or completion)."""

    name: str

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[Generation]: ...


@runtime_checkable
class VisionEngine(Protocol):
    """Generates one caption per image for a shared instruction prompt."""

    name: str

    def caption(self, images: Sequence[Image.Image], prompt: str, params: Sequence[SamplingParams]) -> list[Generation]: ...
