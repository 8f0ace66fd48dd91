"""What a vision-language model says, as a caption: its first line without openers, and whether it is one.

The VeC stage keeps a generation only when it can stand as a caption (not
empty, no echo of the prompt, no loop, no assistant chatter); the fusion stage
cleans its LLM's output the same way before validating it.
"""

from __future__ import annotations

import re

from curation.rewrite import parse_output
from curation.validation import chatter


class Degenerate:
    """Why a VLM output is not a caption. Stable strings: counted in the manifest."""

    EMPTY = "empty"
    ECHO = "echo_of_prompt"
    REPEATED = "repeated_tokens"
    TOO_SHORT = "too_short"
    # A refusal or small talk ("I'm sorry, I can't identify people", "Sure! Here is ..."): an instruct VLM's
    # answer about the picture, not a caption of it, which would train CLIP (and a fusion falling back to it).
    CHATTER = "chatter"


# Openers a VLM puts before the content ("The image shows ...", "In this photo, ..."): noise for a CLIP
# caption. The noun must be followed by a verb, "of", a comma or a colon: "The picture frame hangs ..." and
# "The scene is a busy market" are captions, not openers.
_PICTURE = r"(?:image|picture|photo(?:graph)?|scene)"
_OPENER = re.compile(
    rf"^\s*(?:in (?:this|the)\s+{_PICTURE}\s*,\s*(?:there (?:is|are)\s+)?|"  # "In this photo, ..."
    rf"(?:this|the|in this|in the)\s+{_PICTURE}\s*(?::\s*|(?:shows|depicts|features|contains|displays|presents|"
    r"is of|of|captures|there (?:is|are))\b\s*:?\s*)|"
    # "This image is a close-up of ...": the picture named as such (a scene is a caption's own subject).
    r"(?:this|the)\s+(?:image|photo|photograph|picture)\s+is\s+(?=an?\s)|"
    r"(?:caption|description)\s*:\s*|(?:assistant)\s*:\s*)",
    re.IGNORECASE)
# The next chat turn a model went on to write: a template's upper-case role ("USER:", LLaVA's and Vicuna's), or
# one in other case where a sentence ends before it; not the words of a sign in the picture ("says 'System: on'").
_TEMPLATE_ROLE = re.compile(r"\b(?:USER|ASSISTANT|SYSTEM)\s*:|(?<=[.!?])\s+(?i:user|assistant|system)\s*:")
# Words as the VeC checks count them, and what tells an alt-text with something to merge.
WORDS = re.compile(r"\w+(?:'\w+)?", re.UNICODE)


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
    words = [w.casefold() for w in WORDS.findall(text)]
    if not words:
        return Degenerate.EMPTY
    plain, prompt_words = " ".join(words), [w.casefold() for w in WORDS.findall(prompt)]
    # As whole words: "Hat is visible" is no echo of "...what is visible". Any run of ECHO_RUN prompt words
    # counts, not only its head: "Only mention what is visible. A dog on a beach." echoes the second sentence.
    runs = {" ".join(prompt_words[i:i + ECHO_RUN]) for i in range(len(prompt_words) - ECHO_RUN + 1)}
    if any(f" {run} " in f" {plain} " for run in runs) or (
            len(words) >= 3 and f" {plain} " in f" {' '.join(prompt_words)} "):
        return Degenerate.ECHO
    if _TEMPLATE_ROLE.search(text):
        return Degenerate.ECHO
    if has_loop(words):
        return Degenerate.REPEATED
    if len(words) < min_words:
        return Degenerate.TOO_SHORT
    if chatter(text) or _NO_PICTURE.search(text):
        return Degenerate.CHATTER
    return None


# Prompt words in a row that make an output an echo of the prompt.
ECHO_RUN = 5
# A VLM saying it has no usable picture: an answer, not a caption ("There is no image provided.").
_NO_PICTURE = re.compile(
    rf"\b(?:no|without an?|not an?)\s+{_PICTURE}\s+(?:was\s+|is\s+|has been\s+)?(?:provided|given|attached|shown|"
    rf"uploaded|included)\b|\b{_PICTURE}\s+is\s+(?:not|too)\s+(?:clear|visible|blurry|dark|small)\b|"
    rf"\b(?:cannot|can't|unable to)\s+(?:see|view|access|open|describe)\s+(?:the|this|an?|your)\s+{_PICTURE}\b",
    re.IGNORECASE)


def has_loop(words: list[str]) -> bool:
    """A word or a 2-4 word phrase three times in a row, a phrase of 5 or more words twice in a row, or a
    long text of few distinct words.

    In a row only: "a red roof, a red door and a red fence" names three red things, it does not loop.
    """
    for n in (1, 2, 3, 4):
        for i in range(len(words) - 3 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n] == words[i + 2 * n:i + 3 * n]:
                return True
    for n in range(5, len(words) // 2 + 1):  # "a red car parked on a street. A red car parked on a street."
        for i in range(len(words) - 2 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n]:
                return True
    return len(words) >= 10 and len(set(words)) / len(words) < 0.4
