"""VeCLIP-style captions: a short visual caption per image (VeC), then its fusion with the alt-text (VeCap).

Step 1, VeC (here): a vision-language model sees the image alone, never the
alt-text (so it cannot copy the alt-text's noise), and is asked for one short
concrete sentence about what is visible. Decoding is greedy; an output that is
empty, echoes the prompt or loops on a word (curation.vlm_output) is retried
with seeded sampling, then counted and left null.

Step 2, fusion (curation.fusion): a text LLM merges the alt-text and the VeC
into one sentence. The config of both steps is here: it is recorded as one.

`synthetic_caption` holds the VeC (ALIP's synthetic caption), `fused_caption`
the VeCap. Both stay null when the captioner produced nothing usable.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from curation.engines import (DEFAULT_MODEL, EngineSpec, Generation, SamplingParams, VisionEngine, check_options,
                              output_options)
from curation.engines.base import CaptionsFailed, prompt_sha256
from curation.engines.recovery import attempts_for, with_retries
from curation.engines.seeding import derive_seed
from curation.fusion import FUSION_PROMPT_VERSION, fusion_completion, fusion_messages
from curation.images import ImageConfig
from curation.validation import VALIDATION_VERSION, ValidationConfig
from curation.vlm_output import clean_vlm_output, degenerate_reason

STAGE = "caption"

# Bump a version whenever its prompt's wording or layout changes: both are recorded in the manifest.
VEC_PROMPT_VERSION = "vec-v1"
VEC_PROMPT = ("Write one short sentence, under 20 words, saying what this picture shows: the main objects, "
              "their number, colours and setting. Only mention what is visible.")

# The VeC prompt is laid out by each vision engine's own processor; the fusion prompts here.
PROMPT_SHA256 = prompt_sha256([VEC_PROMPT, fusion_messages("{alt}", "{visual}"),
                               fusion_completion("{alt}", "{visual}")])


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
        check_options("vision", self.captioner_engine, self.captioner_options, "captioner options")
        if self.fuse:
            check_options("text", self.fusion_engine, self.fusion_options, "fusion options")
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


@dataclass
class RowCaption:
    """One image's VeC (None when every attempt was degenerate) and what producing it took."""

    text: str | None
    stats: collections.Counter


# Each vLLM engine's share of the GPU when the captioner and the fusion LLM both run on vLLM.
VLLM_SHARED_GPU = 0.45
log = logging.getLogger(__name__)

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
        self.start_run()

    def start_run(self) -> "Captioner":
        """Forget the error counts of an earlier run: the captioner outlives a run in its process (a retry,
        a notebook), and a run stopped for failing images failed the resume at its first batch."""
        self.errors_in_row = 0  # across batches: whether an image fails alone must not depend on its batch
        self.recent_errors: collections.deque[bool] = collections.deque(maxlen=ERROR_WINDOW)
        return self

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
                if out is None:  # its request failed on its own: counted, and named for whoever asks which
                    stats["vec.engine_error"] += 1
                    stats["vec.null"] += 1
                    log.warning("captioner %s: no VeC for key %r, its request failed after its retries; the row "
                                "keeps a null synthetic_caption", self.engine.name, keys[i])
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
