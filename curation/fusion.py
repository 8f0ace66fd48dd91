"""VeCLIP fusion: a text LLM merges the alt-text and the VeC into one caption, the VeCap.

The merged sentence keeps the alt-text's names, places, brands and numbers
and adds the VeC's visual detail. It is validated like a rewrite
(curation.validation), must keep the alt-text's names (curation.names), and
falls back to the VeC when every attempt is refused.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from curation.engines import SamplingParams, TextEngine
from curation.engines.recovery import generate_with_recovery
from curation.engines.seeding import derive_seed
from curation.languages import dominant_script
from curation.names import names_in
from curation.rewrite import clean_caption as clean_prompt_text
from curation.validation import OutputReason, changed_fact, check_output, in_other_language, normalise
from curation.vlm_output import WORDS, clean_vlm_output, has_loop

if TYPE_CHECKING:  # caption.py imports this module's prompts for its config and prompt hash
    from curation.caption import CaptionConfig

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


class FusionReason:
    """Fusion refusals beyond the shared rewrite checks."""

    LOST_PROPER_NOUN = "lost_proper_noun"


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
        # The VeC's loop check: check_output catches a text that loops as a whole, not "at night at night
        # at night" at the end of a good sentence.
        if has_loop([w.casefold() for w in WORDS.findall(fused)]):
            return OutputReason.REPETITIVE
        script = dominant_script(fused)
        same = [text for text in (alt_text, vec) if dominant_script(text) in (script, None)]
        if cfg.validation.check_script and script and not same:
            return OutputReason.SCRIPT
        same = [text for text in same if not in_other_language(text, fused)]
        if cfg.validation.check_language and not same:
            return OutputReason.LANGUAGE
        both = f"{alt_text} {vec}"  # a count or colour either input states is no invention
        if cfg.validation.keep_numbers_and_colours and any(changed_fact(text, fused, both) for text in same):
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
            if WORDS.search(alt):
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
