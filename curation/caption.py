"""VeCLIP-style captions: a short visual caption per image (VeC), then its fusion with the alt-text (VeCap).

Step 1, VeC: a vision-language model sees the image alone, never the
alt-text (so it cannot copy the alt-text's noise), and is asked for one short
concrete sentence about what is visible. Decoding is greedy; an output that is
empty, echoes the prompt or loops on a word is retried with seeded sampling,
then counted and left null.

Step 2, fusion: a text LLM merges the alt-text and the VeC into one sentence
that keeps the alt-text's names, places, brands and numbers and adds the VeC's
visual detail. The output is validated like a rewrite (curation.validation),
must keep the alt-text's names (curation.names), and falls back to the VeC when every
attempt is refused.

`synthetic_caption` holds the VeC (ALIP's synthetic caption), `fused_caption`
the VeCap. Both stay null when the captioner produced nothing usable.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from PIL import Image

from curation.engines import (DEFAULT_MODEL, EngineSpec, Generation, SamplingParams, TextEngine, VisionEngine,
                              output_options)
from curation.engines.base import CaptionsFailed, prompt_sha256
from curation.engines.recovery import attempts_for, generate_with_recovery, with_retries
from curation.engines.seeding import derive_seed
from curation.images import ImageConfig
from curation.rewrite import clean_caption as clean_prompt_text
from curation.rewrite import parse_output
from curation.languages import dominant_script
from curation.names import names_in
from curation.validation import (VALIDATION_VERSION, OutputReason, ValidationConfig, changed_fact, chatter,
                                 check_output, in_other_language, normalise)

STAGE = "caption"

# Bump a version whenever its prompt's wording or layout changes: both are recorded in the manifest.
VEC_PROMPT_VERSION = "vec-v1"
VEC_PROMPT = ("Write one short sentence, under 20 words, saying what this picture shows: the main objects, "
              "their number, colours and setting. Only mention what is visible.")

FUSION_PROMPT_VERSION = "vecap-v1"
FUSION_INSTRUCTION = ("You combine two descriptions of the same picture into one short caption. The web text may "
                      "name people, places, brands, dates or numbers: keep every one of them. The visual "
                      "description says what the picture looks like: add its objects, colours and setting. Put "
                      "adjectives before the nouns they describe. Add nothing that neither text says. Answer with "
                      "the caption only, in one sentence.")
FUSION_COMPLETION_HEADER = ("Web text and a visual description of the same picture, merged into one caption that "
                            "keeps the names from the web text and the visual details from the description:")
# The labels the request puts before its two texts; a VeCap holding one (that its inputs do not) is an echo.
WEB_TEXT, VISUAL_DESCRIPTION = "Web text:", "Visual description:"
FUSION_LABELS = (WEB_TEXT.casefold(), VISUAL_DESCRIPTION.casefold())


def fusion_messages(alt: str, visual: str) -> list[dict[str, str]]:
    """A chat model's fusion request: the instruction, then both texts as values in one user turn."""
    return [{"role": "system", "content": FUSION_INSTRUCTION},
            {"role": "user", "content": f"{WEB_TEXT} {alt}\n{VISUAL_DESCRIPTION} {visual}"}]


def fusion_completion(alt: str, visual: str) -> str:
    """A base model's fusion request, ending where the merged caption starts."""
    return f"{FUSION_COMPLETION_HEADER}\n\n{WEB_TEXT} {alt}\n{VISUAL_DESCRIPTION} {visual}\nCaption:"


# The VeC prompt is laid out by each vision engine's own processor; the fusion prompts here.
PROMPT_SHA256 = prompt_sha256([VEC_PROMPT, fusion_messages("{alt}", "{visual}"),
                               fusion_completion("{alt}", "{visual}")])


class Degenerate:
    """Why a VLM output is not a caption. Stable strings: counted in the manifest."""

    EMPTY = "empty"
    ECHO = "echo_of_prompt"
    REPEATED = "repeated_tokens"
    TOO_SHORT = "too_short"
    # A refusal or small talk ("I'm sorry, I can't identify people", "Sure! Here is ..."): an instruct VLM's
    # answer about the picture, not a caption of it, which would train CLIP (and a fusion falling back to it).
    CHATTER = "chatter"


class FusionReason:
    """Fusion refusals beyond the shared rewrite checks."""

    LOST_PROPER_NOUN = "lost_proper_noun"


# Openers a VLM puts before the content ("The image shows ...", "In this photo, ..."): noise for a CLIP
# caption. The noun must be followed by a verb, "of", a comma or a colon: "The picture frame hangs ..." and
# "The scene is a busy market" are captions, not openers.
_PICTURE = r"(?:image|picture|photo(?:graph)?|scene)"
_OPENER = re.compile(
    rf"^\s*(?:in (?:this|the)\s+{_PICTURE}\s*,\s*(?:there (?:is|are)\s+)?|"  # "In this photo, ..."
    rf"(?:this|the|in this|in the)\s+{_PICTURE}\s*(?::\s*|(?:shows|depicts|features|contains|displays|presents|"
    r"is of|of|captures|there (?:is|are))\b\s*:?\s*)|"
    r"(?:caption|description)\s*:\s*|(?:assistant)\s*:\s*)",
    re.IGNORECASE)
_TEMPLATE_ROLE = re.compile(r"\b(?:USER|ASSISTANT|SYSTEM)\s*:", re.IGNORECASE)
_WORDS = re.compile(r"\w+(?:'\w+)?", re.UNICODE)


@dataclass(frozen=True)
class CaptionConfig:
    """Everything that decides the captions; recorded in the manifest."""

    # The captioner (a VLM): engine, hub id or local folder, dtype, backend options.
    captioner_engine: str = "transformers"
    captioner_model: str = ""
    captioner_dtype: str = "auto"
    captioner_options: dict[str, Any] = field(default_factory=dict)
    prompt: str = VEC_PROMPT
    prompt_version: str = VEC_PROMPT_VERSION
    max_new_tokens: int = 40
    temperature: float = 0.0  # greedy first: a caption that does not depend on luck
    retry_temperature: float = 0.7
    retry_top_p: float = 0.9
    retries: int = 2  # extra sampled attempts for a degenerate caption
    min_words: int = 2
    image: ImageConfig = field(default_factory=ImageConfig)
    images_per_batch: int = 16  # RunInference batch of the captioner
    engine_retries: int = 2  # retries of a failed engine call (both models), with a doubling pause
    engine_backoff_s: float = 1.0
    # Fusion (VeCap) with a text LLM; fuse=False leaves fused_caption null.
    fuse: bool = True
    fusion_engine: str = "transformers"
    fusion_model: str = DEFAULT_MODEL
    fusion_gguf_file: str | None = None
    fusion_dtype: str = "auto"
    fusion_options: dict[str, Any] = field(default_factory=dict)
    fusion_prompt_format: str = "auto"  # "chat", "completion" or "auto" (chat when the model has a template)
    fusion_prompt_version: str = FUSION_PROMPT_VERSION
    fusion_temperature: float = 0.3
    fusion_top_p: float = 0.9
    fusion_max_new_tokens: int = 60
    fusion_attempts: int = 2
    fusion_per_batch: int = 64
    fusion_keep_proper_nouns: bool = True
    validation: ValidationConfig = field(default_factory=lambda: ValidationConfig(max_words=60))

    def __post_init__(self) -> None:
        if self.retries < 0 or self.fusion_attempts < 1:
            raise ValueError("retries must be >= 0 and fusion_attempts >= 1")
        if self.retries and self.retry_temperature <= 0:
            raise ValueError("retries need retry_temperature > 0, or they repeat the greedy caption")
        if self.engine_retries < 0 or self.engine_backoff_s < 0:
            raise ValueError("engine_retries and engine_backoff_s must be >= 0")
        if self.images_per_batch < 1 or self.fusion_per_batch < 1:
            raise ValueError("images_per_batch and fusion_per_batch must be at least 1")
        if self.fusion_prompt_format not in ("auto", "chat", "completion"):
            raise ValueError(f"fusion_prompt_format must be auto, chat or completion, "
                             f"got {self.fusion_prompt_format!r}")
        if not self.prompt.strip():
            raise ValueError("the caption prompt is empty")
        # Here, not in a Beam worker after the models have loaded and the stage has recorded this config.
        SamplingParams(self.max_new_tokens, self.temperature)
        SamplingParams(self.max_new_tokens, self.retry_temperature, self.retry_top_p)
        SamplingParams(self.fusion_max_new_tokens, self.fusion_temperature, self.fusion_top_p)
        if self.fuse and self.fusion_temperature == 0 and self.fusion_attempts > 1:
            raise ValueError("with fusion_temperature 0 a fusion retry repeats the refused output (greedy decoding "
                             "ignores its seed): set fusion_attempts to 1 or a fusion_temperature above 0")

    def recorded(self) -> dict[str, Any]:
        """What decides the captions, for the stage config a resume must match: not the retries, the batch
        sizes (sampling is seeded per row) or the engines' run options (RUN_OPTIONS)."""
        fields = asdict(self) | {"captioner_options": output_options(self.captioner_options),
                                 "fusion_options": output_options(self.fusion_options),
                                 "validation_version": VALIDATION_VERSION}
        run_only = ("engine_retries", "engine_backoff_s", "images_per_batch", "fusion_per_batch")
        return {k: v for k, v in fields.items() if k not in run_only}

    def captioner_spec(self) -> EngineSpec:
        return EngineSpec(self.captioner_engine, self.captioner_model, None, self.captioner_dtype,
                          self._gpu_share(self.captioner_options))

    def fusion_spec(self) -> EngineSpec:
        return EngineSpec(self.fusion_engine, self.fusion_model, self.fusion_gguf_file, self.fusion_dtype,
                          self._gpu_share(self.fusion_options))

    def _gpu_share(self, options: dict[str, Any]) -> dict[str, Any]:
        """The engine's options; with both engines on vLLM in the one pipeline, half the GPU each unless
        set (each alone defaults to 0.85-0.9 of it, and the second would not start)."""
        both = self.fuse and self.captioner_engine == self.fusion_engine == "vllm"
        return {"gpu_memory_utilization": VLLM_SHARED_GPU, **options} if both else dict(options)


def clean_vlm_output(text: str) -> str:
    """The caption in a VLM generation: first non-empty line, openers such as "The image shows" removed."""
    line = parse_output(text)
    role = _TEMPLATE_ROLE.search(line, 1)
    if role:  # the model went on to write the next chat turn: keep what came before it
        line = line[:role.start()].strip()
    stripped = _OPENER.sub("", line, count=1).strip()
    if stripped and stripped != line:
        stripped = stripped[0].upper() + stripped[1:] if line[:1].isupper() else stripped
    return " ".join(stripped.split())


def degenerate_reason(text: str, prompt: str, min_words: int = 2) -> str | None:
    """None if `text` can stand as a caption, else why not (Degenerate.*)."""
    words = [w.casefold() for w in _WORDS.findall(text)]
    if not words:
        return Degenerate.EMPTY
    plain, prompt_plain = " ".join(words), " ".join(w.casefold() for w in _WORDS.findall(prompt))
    prompt_head = " ".join(prompt_plain.split()[:6])
    # As whole words: "Hat is visible" is no echo of "...what is visible".
    if (prompt_head and f" {prompt_head} " in f" {plain} ") or (
            len(words) >= 3 and f" {plain} " in f" {prompt_plain} "):
        return Degenerate.ECHO
    if _TEMPLATE_ROLE.search(text):
        return Degenerate.ECHO
    if _has_loop(words):
        return Degenerate.REPEATED
    if len(words) < min_words:
        return Degenerate.TOO_SHORT
    if chatter(text):
        return Degenerate.CHATTER
    return None


def _has_loop(words: list[str]) -> bool:
    """A word or a 2-4 word phrase three times in a row, or a long text of few distinct words.

    In a row only: "a red roof, a red door and a red fence" names three red things, it does not loop.
    """
    for n in (1, 2, 3, 4):
        for i in range(len(words) - 3 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n] == words[i + 2 * n:i + 3 * n]:
                return True
    return len(words) >= 10 and len(set(words)) / len(words) < 0.4


@dataclass
class RowCaption:
    """One image's VeC (None when every attempt was degenerate) and what producing it took."""

    text: str | None
    stats: collections.Counter


# Each vLLM engine's share of the GPU when the captioner and the fusion LLM both run on vLLM.
VLLM_SHARED_GPU = 0.45
# Images in a row that each failed on their own: past this the captioner, not an image, is what fails.
IMAGE_ERRORS_IN_ROW = 8
# Over this share of the last ERROR_WINDOW images (once ERROR_WINDOW_MIN are in) failing on their own, the
# engine fails intermittently (an overloaded server timing out every other request): each of those rows
# would keep a null caption that no resume asks for again, so the run stops instead.
MAX_ERROR_SHARE, ERROR_WINDOW, ERROR_WINDOW_MIN = 0.25, 256, 32


class Captioner:
    """VeC for a batch of images: greedy first, seeded sampling for the rows that came out degenerate."""

    def __init__(self, engine: VisionEngine, config: CaptionConfig):
        self.engine, self.config = engine, config
        self.errors_in_row = 0  # across batches: whether an image fails alone must not depend on its batch
        self.recent_errors: collections.deque[bool] = collections.deque(maxlen=ERROR_WINDOW)

    def caption(self, keys: Sequence[str], images: Sequence[Image.Image], seed: int) -> list[RowCaption]:
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys but {len(images)} images")
        cfg = self.config
        rows = [RowCaption(None, collections.Counter()) for _ in keys]
        pending = list(range(len(keys)))
        for attempt in range(cfg.retries + 1):
            if not pending:
                break
            temperature = cfg.temperature if attempt == 0 else cfg.retry_temperature
            top_p = 1.0 if temperature == 0 else cfg.retry_top_p
            params = [SamplingParams(cfg.max_new_tokens, temperature, top_p, derive_seed(seed, keys[i], "vec", attempt))
                      for i in pending]
            outputs = self._generate([images[i] for i in pending], params)
            still = []
            for i, out in zip(pending, outputs):
                stats = rows[i].stats
                if out is None:
                    stats["vec.engine_error"] += 1
                    stats["vec.null"] += 1
                    continue
                stats["vec.requests"] += 1
                stats["vec.prompt_tokens"] += out.prompt_tokens
                stats["vec.completion_tokens"] += out.completion_tokens
                text = clean_vlm_output(out.text)
                reason = degenerate_reason(text, cfg.prompt, cfg.min_words)
                if reason is None:
                    rows[i].text = text
                    stats["vec.kept"] += 1
                    if attempt:
                        stats["vec.kept_after_retry"] += 1
                else:
                    stats[f"vec.degenerate.{reason}"] += 1
                    still.append(i)
            pending = still
        for i in pending:
            rows[i].stats["vec.null"] += 1
        return rows

    def _generate(self, images: list[Image.Image], params: list[SamplingParams]) -> list[Generation | None]:
        """The engine's captions; if the batch still fails after its retries (a server restarting, a
        passing out-of-memory), image by image, with None for an image that alone fails.

        One image the backend cannot handle (a processor edge case) then costs its own caption, not the
        shard, whether it came in a batch or alone (a request that timed out too). An engine that says which
        of its captions came back (CaptionsFailed: a server's requests, each retried by its client) keeps
        those; its failed requests count as failed alone and the ones it did not send go again as a batch,
        concurrent still. The error goes up when the engine itself is down: a server it cannot connect to
        (`engine.unreachable`), IMAGE_ERRORS_IN_ROW images in a row that each failed on their own, or over
        MAX_ERROR_SHARE of the recent ones.
        """
        outputs: list[Generation | None] = [None] * len(images)
        todo = list(range(len(images)))
        while todo:
            try:
                got = self._batch([images[i] for i in todo], [params[i] for i in todo])
            except Exception as batch_error:
                if self._unreachable(batch_error):
                    raise
                if not (isinstance(batch_error, CaptionsFailed) and len(batch_error.results) == len(todo)):
                    for i in todo:
                        outputs[i] = self._alone(images[i], params[i], batch_error if len(todo) == 1 else None)
                    break
                unsent, failed_alone = [], set(batch_error.failed)
                for j, (i, output) in enumerate(zip(todo, batch_error.results)):
                    if output is not None:
                        outputs[i], self.errors_in_row = output, 0
                    elif j in failed_alone:
                        self._alone(images[i], params[i], batch_error)  # counted: its client retried it already
                    else:
                        unsent.append(i)
                todo = unsent
                continue
            if len(got) != len(todo):
                raise RuntimeError(f"captioner {self.engine.name} returned {len(got)} captions "
                                   f"for {len(todo)} images")
            for i, output in zip(todo, got):
                outputs[i] = output
            self.errors_in_row = 0
            break
        self.recent_errors.extend(output is None for output in outputs)
        failed, seen = sum(self.recent_errors), len(self.recent_errors)
        if seen >= ERROR_WINDOW_MIN and failed > MAX_ERROR_SHARE * seen:
            raise RuntimeError(f"captioner {self.engine.name}: {failed} of the last {seen} images failed on their "
                               f"own (over {MAX_ERROR_SHARE:.0%}), so the engine fails intermittently (a server "
                               f"overloaded or timing out?); finished shards are kept: rerun to resume")
        return outputs

    def _batch(self, images: list[Image.Image], params: list[SamplingParams]) -> list[Generation]:
        """One engine call over `images`, with the engine's retries."""
        cfg = self.config
        return list(with_retries(lambda: self.engine.caption(images, cfg.prompt, params),
                                 attempts=attempts_for(self.engine, cfg.engine_retries),
                                 backoff_s=cfg.engine_backoff_s,
                                 what=f"captioner {self.engine.name} on {len(images)} images"))

    def _alone(self, image: Image.Image, params: SamplingParams, error: Exception | None) -> Generation | None:
        """One image's caption asked alone (`error`: how that already failed), None if it fails."""
        if error is None:
            try:
                output = self.engine.caption([image], self.config.prompt, [params])[0]
                self.errors_in_row = 0
                return output
            except Exception as exc:  # noqa: BLE001 - counted per image; re-raised when the engine is down
                if self._unreachable(exc):
                    raise
                error = exc
        self.errors_in_row += 1
        if self.errors_in_row >= IMAGE_ERRORS_IN_ROW:
            raise RuntimeError(f"captioner {self.engine.name}: {self.errors_in_row} images in a row failed on "
                               f"their own, so the engine itself is failing: {error}") from error
        return None

    def _unreachable(self, error: Exception) -> bool:
        if isinstance(error, CaptionsFailed) and isinstance(error.__cause__, Exception):
            error = error.__cause__  # the first failed request's own error
        check = getattr(self.engine, "unreachable", None)
        return isinstance(error, ConnectionError) or bool(check and check(error))


@dataclass
class RowFusion:
    """One VeCap (the VeC itself when every fusion was refused) and what it took."""

    text: str
    stats: collections.Counter


class Fuser:
    """Merges alt-text and VeC with a text LLM; validated like a rewrite; falls back to the VeC."""

    def __init__(self, engine: TextEngine, config: CaptionConfig):
        self.engine, self.config = engine, config
        chat_capable = bool(getattr(engine, "has_chat_template", False))
        if config.fusion_prompt_format == "chat" and not chat_capable:
            raise ValueError(f"{engine.name} has no chat template; use fusion_prompt_format='completion'")
        self.chat = config.fusion_prompt_format == "chat" or (config.fusion_prompt_format == "auto" and chat_capable)
        self.stop = () if self.chat else ("\n",)
        self.special_tokens = list(getattr(engine, "special_tokens", []) or [])

    @property
    def format_name(self) -> str:
        return "chat" if self.chat else "completion"

    def clean(self, text: str) -> str:
        """A text as the fusion prompt holds it: chat markup out, cut to a prompt's length."""
        return clean_prompt_text(text, self.special_tokens)

    def prompt(self, alt_text: str, vec: str) -> str:
        """The fusion request. Both texts are data: cleaned of chat markup and placed as values only."""
        return self._layout(self.clean(alt_text), self.clean(vec))

    def _layout(self, alt: str, visual: str) -> str:
        """The fusion request around texts already cleaned (`clean`)."""
        if self.chat:
            return self.engine.format_chat(fusion_messages(alt, visual))  # type: ignore[attr-defined]
        return fusion_completion(alt, visual)

    def check(self, alt_text: str, vec: str, fused: str) -> str | None:
        """None for a usable fusion, else the reason (OutputReason.* or FusionReason.*)."""
        cfg = self.config
        if fused.strip() and normalise(fused) in (normalise(alt_text), normalise(vec), normalise(f"{vec} {alt_text}")):
            return OutputReason.IDENTICAL  # nothing was merged (the alt-text then the VeC is check_output's)
        # The request's own layout ("Web text: <the alt-text>", or both lines echoed) is no merged caption.
        if any(label in fused.casefold() and label not in f"{alt_text} {vec}".casefold() for label in FUSION_LABELS):
            return OutputReason.ECHO
        # Language and facts are judged against each input on its own: with German alt-text and an English
        # VeC, a fusion in either language is one, and keeps the numbers and colours of the text it is in.
        # Checked against the two as one text, every fusion was in another language than that mix.
        whole = replace(cfg.validation, check_script=False, check_language=False, keep_numbers_and_colours=False)
        reason = check_output(f"{alt_text} {vec}", fused, whole,
                              echo_texts=(FUSION_INSTRUCTION, FUSION_COMPLETION_HEADER))
        if reason is not None:
            return reason
        script = dominant_script(fused)
        same = [text for text in (alt_text, vec) if dominant_script(text) in (script, None)]
        if cfg.validation.check_script and script and not same:
            return OutputReason.SCRIPT
        same = [text for text in same if not in_other_language(text, fused)]
        if cfg.validation.check_language and not same:
            return OutputReason.LANGUAGE
        if cfg.validation.keep_numbers_and_colours and any(changed_fact(text, fused) for text in same):
            return OutputReason.CHANGED_FACT
        if cfg.fusion_keep_proper_nouns and names_in(alt_text, seen=vec).lost_in(fused):
            return FusionReason.LOST_PROPER_NOUN
        return None

    def fuse(self, keys: Sequence[str], alt_texts: Sequence[str], vecs: Sequence[str], seed: int) -> list[RowFusion]:
        cfg = self.config
        rows = [RowFusion(vec, collections.Counter()) for vec in vecs]
        # Judged against the texts the model was shown (a name past the cut is not one it could keep).
        alt_texts, shown_vecs = [self.clean(t) for t in alt_texts], [self.clean(v) for v in vecs]
        pending = []
        for i, alt in enumerate(alt_texts):
            if _WORDS.search(alt):
                pending.append(i)
                rows[i].stats[f"fusion.prompt_format.{self.format_name}"] += 1  # see mixed_formats_warning
            else:  # nothing to merge: the VeC is the VeCap (VeCLIP's rule for an empty alt-text)
                rows[i].stats["fusion.empty_alt_text"] += 1
        for attempt in range(cfg.fusion_attempts):
            if not pending:
                break
            prompts = [self._layout(alt_texts[i], shown_vecs[i]) for i in pending]
            params = [SamplingParams(cfg.fusion_max_new_tokens, cfg.fusion_temperature, cfg.fusion_top_p,
                                     derive_seed(seed, keys[i], "fusion", attempt)) for i in pending]
            outputs = generate_with_recovery(self.engine, prompts, params, stop=self.stop,
                                             retries=cfg.engine_retries, backoff_s=cfg.engine_backoff_s)
            still = []
            for i, out in zip(pending, outputs):
                stats = rows[i].stats
                stats["fusion.requests"] += 1
                stats["fusion.prompt_tokens"] += out.prompt_tokens
                stats["fusion.completion_tokens"] += out.completion_tokens
                text = clean_vlm_output(out.text)
                reason = self.check(alt_texts[i], shown_vecs[i], text)
                if reason is None:
                    rows[i].text = text
                    stats["fusion.kept"] += 1
                else:
                    stats[f"fusion.rejected.{reason}"] += 1
                    still.append(i)
            pending = still
        for i in pending:
            rows[i].stats["fusion.fallback_to_vec"] += 1
        return rows


def summarise(stats: collections.Counter) -> dict[str, Any]:
    """Totals plus the shares a manifest reports."""
    out: dict[str, Any] = dict(sorted(stats.items()))
    images = stats.get("vec.kept", 0) + stats.get("vec.null", 0)
    if images:
        out["vec_null_share"] = round(stats.get("vec.null", 0) / images, 4)
    fused = stats.get("fusion.kept", 0) + stats.get("fusion.fallback_to_vec", 0)
    if fused:
        out["fusion_fallback_share"] = round(stats.get("fusion.fallback_to_vec", 0) / fused, 4)
    return out
