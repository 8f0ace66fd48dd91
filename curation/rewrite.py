"""LaCLIP-style caption rewriting: in-context examples, k sampled rewrites, validation, fallback.

Each request shows the model a fixed instruction, a few input => output
example pairs, then the caption. The examples come from a small fixed set of
example groups, and rewrite i of a caption uses group (hash(seed, key) + i) mod
n_groups: a caption gets a different group per rewrite (as LaCLIP does one
pass per example source), while thousands of requests share each group's
prompt prefix, which vLLM's prefix cache then computes once.

The caption is data. It only ever fills the last user turn (or the last line
of a completion prompt) as a value: it is never formatted into a template,
used in a path, or passed to a shell, and special-token markup in it is
removed so it cannot open a new chat turn.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from curation.engines import (DEFAULT_MODEL, EngineSpec, Generation, SamplingParams, TextEngine, check_options,
                              output_options)
from curation.engines.base import prompt_sha256
from curation.engines.recovery import generate_with_recovery
from curation.engines.seeding import derive_seed
from curation.meaning import MeaningOverlap
from curation.validation import VALIDATION_VERSION, ValidationConfig, check_output

STAGE = "rewrite"
# Bump when the instruction, the examples or the prompt layout change: it is recorded in the manifest.
PROMPT_VERSION = "icl-v1"

CHAT_INSTRUCTION = ("You rewrite image captions. Answer with one new caption that says the same thing in other "
                    "words. Keep every name, number and colour. Drop file names, credits and ads. "
                    "Answer with the caption only.")
COMPLETION_HEADER = "Each image caption below is followed by a fresh rewording of it:"


@dataclass(frozen=True)
class ExamplePair:
    source: str
    target: str


# The project's own examples, by the kinds of alt-text a web pool holds. Group g, slot j takes
# KINDS[(g + j) % len(KINDS)][g % 4], so every group mixes kinds and no two groups share a pair.
EXAMPLES_BY_KIND: tuple[tuple[ExamplePair, ...], ...] = (
    (  # plain descriptive alt-text
        ExamplePair("three brown horses grazing in a green field", "a green pasture where three brown horses eat grass"),
        ExamplePair("A photo of a yellow taxi parked on a city street.", "a yellow cab standing at the curb of a busy street"),
        ExamplePair("two white mugs of coffee on a wooden table", "a wooden tabletop with a pair of white coffee cups"),
        ExamplePair("small red boat on a calm lake at sunset", "a little red rowing boat resting on still water as the sun goes down"),
    ),
    (  # short labels and fragments
        ExamplePair("blue triangle icon", "a simple blue triangle symbol"),
        ExamplePair("orange cat", "an orange tabby cat"),
        ExamplePair("Green squares, flat illustration", "flat vector drawing of several green squares"),
        ExamplePair("some hexagons", "a group of hexagon shapes"),
    ),
    (  # alt-text wrapped in file names, credits, emoji or SEO junk
        ExamplePair("IMG_2231.jpg | black dog on the beach", "a black dog standing on a sandy beach"),
        ExamplePair("purple stars - Photo by Ana Lima", "several purple star shapes"),
        ExamplePair("✨ new post ✨ pink donuts with sprinkles", "pink frosted doughnuts covered in sprinkles"),
        ExamplePair("Download free HD wallpaper snowy mountain peak", "a snow-covered mountain summit"),
    ),
    (  # product, stock and social-media phrasing
        ExamplePair("Men's Classic Leather Wallet - Brown", "a brown leather wallet for men"),
        ExamplePair("Stock image: four red apples isolated on white", "four red apples against a white background"),
        ExamplePair("Our garden this morning! So many tulips 🌷", "a garden full of tulips in the morning"),
        ExamplePair("Vintage Round Wall Clock, Black Frame", "an old-fashioned round clock on a wall with a black rim"),
    ),
)

# Markup that opens or closes a chat turn in common templates (ChatML and Llama 3 `<|...|>`, Llama 2, Mistral,
# Gemma, DeepSeek's full-width bars); a caption must not carry it into a prompt. The model's own special
# tokens are removed too where its tokenizer is at hand: a server's model (openai engine) may have none here.
_SPECIAL_MARKUP = re.compile(r"<\|[^|<>]{0,40}\|>|<｜[^｜<>]{0,40}｜>|</?s>|\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|"
                             r"TOOL_CALLS|TOOL_RESULTS)\]|<<?/?SYS>>?|<\|?(?:bos|eos|pad|unk)\|?>|"
                             r"<(?:start|end)_of_(?:turn|text|image)>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_QUOTES = "\"'“”‘’`"


@dataclass(frozen=True)
class RewriteConfig:
    """Everything that decides the rewrites; recorded in the manifest."""

    engine: str = "transformers"
    model: str = DEFAULT_MODEL
    gguf_file: str | None = None
    dtype: str = "auto"
    engine_options: dict[str, Any] = field(default_factory=dict)
    prompt_format: str = "auto"  # "chat" (the model's chat template), "completion" (base model), or "auto"
    k: int = 4
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 77
    examples_per_prompt: int = 3
    example_groups: int = 4
    max_attempts: int = 3  # generations per rewrite slot before falling back to the original caption
    # Prompts handed to the engine at once; None: as many as the engine prefers (all of them for vLLM and a
    # server, one memory-sized batch for transformers on a GPU).
    requests_per_call: int | None = None
    engine_retries: int = 2
    engine_backoff_s: float = 1.0  # first pause before an engine retry; it doubles each time
    max_caption_bytes: int = 600  # UTF-8 bytes of a caption kept in its prompt (clean_caption)
    meaning_check: bool = False  # reject outputs whose embedding is far from the caption's
    # Share of rows to rewrite, drawn by hash(seed, key); the others keep a null `rewrites` (small demos).
    row_fraction: float = 1.0
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    prompt_version: str = PROMPT_VERSION

    def __post_init__(self) -> None:
        if self.prompt_format not in ("auto", "chat", "completion"):
            raise ValueError(f"prompt_format must be auto, chat or completion, got {self.prompt_format!r}")
        if self.k < 1 or self.max_attempts < 1 or (self.requests_per_call is not None and self.requests_per_call < 1):
            raise ValueError("k, max_attempts and requests_per_call must be at least 1")
        if self.engine_retries < 0 or self.engine_backoff_s < 0:
            raise ValueError("engine_retries and engine_backoff_s must be >= 0")
        per_kind = min(len(kind) for kind in EXAMPLES_BY_KIND)
        if not 1 <= self.example_groups <= per_kind:
            raise ValueError(f"example_groups must be in 1..{per_kind}")
        if not 0 < self.row_fraction <= 1:
            raise ValueError(f"row_fraction must be in (0, 1], got {self.row_fraction}")
        if not 0 <= self.examples_per_prompt <= len(EXAMPLES_BY_KIND):
            raise ValueError(f"examples_per_prompt must be in 0..{len(EXAMPLES_BY_KIND)}")
        # Here, not in a Beam worker after the model has loaded and the stage has recorded this config.
        SamplingParams(self.max_new_tokens, self.temperature, self.top_p)
        check_options("text", self.engine, self.engine_options, "rewrite engine options")
        if self.temperature == 0 and self.max_attempts > 1:
            raise ValueError("with temperature 0 a retry repeats the refused output (greedy decoding ignores its "
                             "seed): set max_attempts to 1 or a temperature above 0")

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(self.engine, self.model, self.gguf_file, self.dtype, dict(self.engine_options))

    def recorded(self) -> dict[str, Any]:
        """What decides the rewrites, for the stage config a resume must match: not the retries, the call
        sizes or the engine's run options, which a resume may change (RUN_OPTIONS)."""
        fields = asdict(self) | {"engine_options": output_options(self.engine_options),
                                 "validation_version": VALIDATION_VERSION}
        if not self.meaning_check:  # decides nothing then: another value must not refuse a resume
            fields["validation"].pop("min_similarity")
        return {k: v for k, v in fields.items() if k not in ("engine_retries", "engine_backoff_s", "requests_per_call")}


def example_group(group: int, size: int) -> tuple[ExamplePair, ...]:
    """The fixed examples of group `group`: one pair from each of `size` successive kinds."""
    kinds = len(EXAMPLES_BY_KIND)
    return tuple(EXAMPLES_BY_KIND[(group + j) % kinds][group % len(EXAMPLES_BY_KIND[0])] for j in range(size))


def chat_messages(examples: Sequence[ExamplePair], caption: str) -> list[dict[str, str]]:
    """A chat model's request: the instruction, each example as a user and an assistant turn, the caption."""
    messages = [{"role": "system", "content": CHAT_INSTRUCTION}]
    for pair in examples:
        messages += [{"role": "user", "content": pair.source}, {"role": "assistant", "content": pair.target}]
    return [*messages, {"role": "user", "content": caption}]


def completion_prompt(examples: Sequence[ExamplePair], caption: str) -> str:
    """A base model's request: the header, one `source => target` line per example, then `caption =>`."""
    return "\n".join([COMPLETION_HEADER, ""] + [f"{p.source} => {p.target}\n" for p in examples] + [f"{caption} =>"])


def rewrite_prompt_sha256() -> str:
    """prompt_sha256 of every group's prompt, in both formats at full size, around a placeholder caption:
    it changes with the instruction, an example, or the layout."""
    groups = [example_group(g, len(EXAMPLES_BY_KIND)) for g in range(len(EXAMPLES_BY_KIND[0]))]
    return prompt_sha256([layout(g, "{caption}") for g in groups for layout in (chat_messages, completion_prompt)])


PROMPT_SHA256 = rewrite_prompt_sha256()


def selected(seed: int, key: str, fraction: float) -> bool:
    """Whether row `key` is rewritten when only `fraction` of rows are (a fixed draw per (seed, key))."""
    return fraction >= 1 or derive_seed(seed, key, "row") / 2 ** 63 < fraction


def group_for(seed: int, key: str, rewrite_index: int, n_groups: int) -> int:
    return (derive_seed(seed, key, "group") + rewrite_index) % n_groups


def clean_caption(caption: str, special_tokens: Sequence[str] = (), max_bytes: int = 600) -> str:
    """The caption as it enters a prompt: one line, no chat markup or special tokens, at most `max_bytes`
    of UTF-8. Bytes, not characters: a token covers at least one byte, so this bounds the caption's tokens
    as well (600 characters of emoji are some 2,400 tokens, past a 2,048-token context)."""
    text = _SPECIAL_MARKUP.sub(" ", caption)
    for token in special_tokens:
        if token:
            text = text.replace(token, " ")
    text = _SPACE.sub(" ", text).strip()
    return text.encode()[:max_bytes].decode(errors="ignore").strip()


def parse_output(text: str) -> str:
    """The rewrite in a generation: its first non-empty line, without wrapping quotes."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            if len(line) > 1 and line[0] in _QUOTES and line[-1] in _QUOTES:
                line = line[1:-1].strip()
            return line
    return ""


@dataclass
class RowRewrite:
    """The k rewrites of one caption (originals where every attempt was refused) and what it cost."""

    rewrites: list[str]
    stats: collections.Counter


@dataclass(frozen=True)
class _Request:
    """One generation: rewrite `slot` of row `row`, try number `attempt`."""

    row: int
    slot: int
    attempt: int


class Rewriter:
    """Builds prompts, calls the engine in batches, validates, retries, and falls back."""

    def __init__(self, engine: TextEngine, config: RewriteConfig, overlap: MeaningOverlap | None = None):
        self.engine, self.config = engine, config
        chat_capable = bool(getattr(engine, "has_chat_template", False))
        if config.prompt_format == "chat" and not chat_capable:
            raise ValueError(f"{engine.name} has no chat template; use prompt_format='completion'")
        self.chat = config.prompt_format == "chat" or (config.prompt_format == "auto" and chat_capable)
        self.stop = () if self.chat else ("\n",)
        self.special_tokens = list(getattr(engine, "special_tokens", []) or [])
        self.overlap = overlap if overlap is not None else (MeaningOverlap() if config.meaning_check else None)
        groups = [example_group(g, config.examples_per_prompt) for g in range(config.example_groups)]
        # Fixed per group, so validation normalises each group's echo texts once (cached by value).
        self.echo_texts = [(CHAT_INSTRUCTION, COMPLETION_HEADER, *(t for p in g for t in (p.source, p.target)))
                           for g in groups]
        self.prefixes = [self._prefix(g) for g in groups]
        self.prefix_tokens = _token_counts(engine, self.prefixes)
        # Tokens of a prompt around an empty caption: with the caption's own, the prompt's length.
        self.frame_tokens = _token_counts(engine, [self._layout(g, "") for g in groups])

    @property
    def format_name(self) -> str:
        return "chat" if self.chat else "completion"

    def _layout(self, examples: Sequence[ExamplePair], caption: str) -> str:
        if self.chat:
            return self.engine.format_chat(chat_messages(examples, caption))  # type: ignore[attr-defined]
        return completion_prompt(examples, caption)

    def _prefix(self, examples: Sequence[ExamplePair]) -> str:
        """The part of a group's prompts that comes before the caption: identical for every request."""
        marker = "\x00caption\x00"
        prompt = self._layout(examples, marker)
        return prompt[:prompt.index(marker)]

    def clean(self, caption: str) -> str:
        return clean_caption(caption, self.special_tokens, self.config.max_caption_bytes)

    def prompt(self, cleaned: str, group: int) -> str:
        """The prompt of example group `group` around a caption as `clean` returns it (the one layout sent)."""
        return self._layout(example_group(group, self.config.examples_per_prompt), cleaned)

    def rewrite(self, keys: Sequence[str], captions: Sequence[str], seed: int) -> list[RowRewrite]:
        """k rewrites per caption. Row order is kept; results depend only on (seed, key, caption, config),
        up to the engine's numerics (exact in fp32 on CPU; see transformers_engine).

        Requests wait in one queue and go to the engine in calls of the
        engine's preferred size; a refused request goes back to the end of the
        queue with its next attempt, so retries ride along in full calls
        instead of trickling out in small ones.
        """
        cfg = self.config
        rows = [RowRewrite(rewrites=[caption] * cfg.k, stats=collections.Counter()) for caption in captions]
        cleaned = [self.clean(caption) for caption in captions]
        groups = [[group_for(seed, key, i, cfg.example_groups) for i in range(cfg.k)] for key in keys]
        queue: collections.deque[_Request] = collections.deque()
        for r, text in enumerate(cleaned):
            if text:
                queue.extend(_Request(r, i, 0) for i in range(cfg.k))
                # Which layout its prompts had: a resume whose engine resolved "auto" otherwise (an openai
                # server's tokenizer found one day, not the next) shows as two formats in the manifest.
                rows[r].stats[f"prompt_format.{self.format_name}"] += 1
            else:
                rows[r].stats["fallback.empty_caption"] += cfg.k
        size = self._call_size(cleaned)
        while queue:
            call = [queue.popleft() for _ in range(min(size or len(queue), len(queue)))]
            for request in self._call(call, keys, cleaned, groups, rows, seed):
                if request.attempt + 1 < cfg.max_attempts:
                    queue.append(_Request(request.row, request.slot, request.attempt + 1))
                else:
                    rows[request.row].stats["fallback"] += 1
        return rows

    def _call_size(self, cleaned: Sequence[str]) -> int | None:
        """Requests per engine call: the configured number, else the engine's preference for these prompts.

        Only an engine that sizes its calls by prompt length (`sizes_by_prompt_length`)
        gets the longest prompt's tokens; the others get 0 and no caption is counted.
        """
        if self.config.requests_per_call:
            return self.config.requests_per_call
        preferred = getattr(self.engine, "preferred_requests_per_call", None)
        if preferred is None:
            return None
        longest = 0
        if getattr(self.engine, "sizes_by_prompt_length", False) and self.frame_tokens is not None:
            longest = max(self.frame_tokens) + (self._longest_caption_tokens(cleaned) or 0)
        return preferred(longest, self.config.max_new_tokens)

    def _longest_caption_tokens(self, cleaned: Sequence[str]) -> int | None:
        """Tokens of the longest caption, counting only captions that could be it.

        A token covers at least one byte (byte-level BPE; SentencePiece adds at
        most one for its leading space), so captions go longest in bytes first,
        in doubling chunks, until none left has more bytes than the most tokens
        seen. A normaliser that expands text could break that bound: then the
        call is sized a little large, and the engine still cuts its batches
        from the real token ids.
        """
        by_size = sorted(((len(text.encode()), text) for text in set(cleaned) if text), reverse=True)
        longest, start, step = 0, 0, 1
        while start < len(by_size) and by_size[start][0] + 1 > longest:
            chunk = [text for size, text in by_size[start:start + step] if size + 1 > longest]
            counts = _token_counts(self.engine, chunk)
            if counts is None:
                return None
            longest, start, step = max(longest, *counts), start + step, 2 * step
        return longest

    def _call(self, call: list[_Request], keys, cleaned, groups, rows, seed) -> list[_Request]:
        """One engine call: generate, validate, keep or refuse; returns the refused requests."""
        cfg = self.config
        prompts = [self.prompt(cleaned[q.row], groups[q.row][q.slot]) for q in call]
        params = [SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                 derive_seed(seed, keys[q.row], q.slot, q.attempt)) for q in call]
        outputs: list[Generation] = generate_with_recovery(self.engine, prompts, params, retries=cfg.engine_retries,
                                                           backoff_s=cfg.engine_backoff_s, stop=self.stop)
        texts = [parse_output(g.text) for g in outputs]
        if self.overlap is not None:
            self.overlap.prime([cleaned[q.row] for q in call] + texts)
        refused = []
        for q, generation, text in zip(call, outputs, texts):
            stats = rows[q.row].stats
            group = groups[q.row][q.slot]
            stats["requests"] += 1
            stats["prompt_tokens"] += generation.prompt_tokens
            stats["completion_tokens"] += generation.completion_tokens
            stats["prefix_reused_tokens"] += generation.cached_tokens
            if self.prefix_tokens is not None:
                stats["prefix_tokens_estimate"] += min(self.prefix_tokens[group], generation.prompt_tokens)
            # Judged against the caption the model was shown (markup out, cut to max_caption_bytes): a fact
            # past the cut is not one the model could keep.
            reason = check_output(cleaned[q.row], text, cfg.validation, echo_texts=self.echo_texts[group],
                                  overlap=self.overlap)
            if reason is None:
                rows[q.row].rewrites[q.slot] = text
                stats["kept"] += 1
            else:
                stats[f"rejected.{reason}"] += 1
                refused.append(q)
        return refused


def _token_counts(engine: TextEngine, texts: list[str]) -> list[int] | None:
    """Token counts when the engine has a tokenizer at hand (an OpenAI endpoint may not)."""
    counter = getattr(engine, "count_tokens", None)
    try:
        return counter(texts) if counter else None
    except (OSError, ValueError):
        return None


def mixed_formats_warning(totals: dict[str, Any], prefix: str, flag: str) -> str | None:
    """A warning when the shards' prompts had more than one layout (the engine resolved "auto" otherwise
    in a resumed run), else None. `prefix` is the stats key of the per-row format counts."""
    formats = {k[len(prefix):]: v for k, v in totals.items() if k.startswith(prefix)}
    if len(formats) < 2:
        return None
    return (f"the rows' prompts had {len(formats)} layouts ({formats}): the engine resolved 'auto' "
            f"differently in a resumed run; name the layout ({flag}) and --overwrite to make them one")


def summarise(stats: collections.Counter) -> dict[str, Any]:
    """Totals plus the derived shares a manifest reports.

    `prefix_reused_share` is measured: the prompt tokens the engine served
    from a cached prefix. `prefix_token_share_estimate` is what a perfect
    prefix cache could serve (every prompt's example-group prefix).
    `fallback_share` counts every rewrite slot that kept the original
    caption, empty captions included.
    """
    # The slot counts are always there, zeros included, so a check or a dashboard never meets a missing key.
    out: dict[str, Any] = dict(sorted(({"kept": 0, "fallback": 0, "fallback.empty_caption": 0} | dict(stats)).items()))
    if stats.get("prompt_tokens"):
        out["prefix_reused_share"] = round(stats.get("prefix_reused_tokens", 0) / stats["prompt_tokens"], 4)
        if "prefix_tokens_estimate" in stats:
            out["prefix_token_share_estimate"] = round(stats["prefix_tokens_estimate"] / stats["prompt_tokens"], 4)
    fallbacks = stats.get("fallback", 0) + stats.get("fallback.empty_caption", 0)
    slots = stats.get("kept", 0) + fallbacks
    if slots:
        out["fallback_share"] = round(fallbacks / slots, 4)
    return out
