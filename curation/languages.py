"""How a text is written: its words, its script, its language. What validation compares outputs on.

The caption pool is multilingual web text, so every rewrite check first needs to know what it is looking
at: whitespace words or characters of a script written without spaces, which script most letters are in,
and which of the common Latin-script languages most words belong to (from wordfreq's word lists).
"""

from __future__ import annotations

import collections
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)
# Scripts written without spaces between words (Chinese, Japanese kana, Thai, Lao, Burmese, Khmer): there a
# character stands in for a word in content comparisons, and two characters make a word in length bounds.
# A regex character range.
UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
UNSPACED_CHAR = re.compile(f"[{UNSPACED}]")


def word_count(text: str) -> int:
    """Words, for the length bounds: split on whitespace, where a run of an unspaced script counts one word
    per two characters (about a Chinese word's length), so that a Chinese sentence is not one word."""
    total = 0
    for token in text.split():
        unspaced = len(UNSPACED_CHAR.findall(token))
        total += -(-unspaced // 2) if unspaced else 1
    return total


def dominant_script(text: str) -> str | None:
    """The Unicode script most letters of `text` belong to (first word of the character name), or None.

    NFKC first: a fullwidth "Ｎ" is named FULLWIDTH LATIN, which would make a
    script of its own.
    """
    counts: dict[str, int] = {}
    for char in unicodedata.normalize("NFKC", text):
        if char.isalpha():
            name = unicodedata.name(char, "")
            script = name.split(" ", 1)[0] if name else "UNKNOWN"
            if script in ("CJK", "HIRAGANA", "KATAKANA"):
                script = "CJK"
            counts[script] = counts.get(script, 0) + 1
    return max(counts, key=counts.get) if counts else None


# Latin-script languages a caption is most often written in; a word counts for each language where it is
# common and at most half a Zipf unit rarer than in its most common one.
LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl")
_KNOWN_ZIPF = 1.5


@lru_cache(maxsize=65536)
def languages_of(word: str) -> frozenset[str]:
    """The languages in which `word` is common (see LANGUAGES); empty for a word none of them knows."""
    from wordfreq import zipf_frequency

    freq = {lang: zipf_frequency(word, lang) for lang in LANGUAGES}
    best = max(freq.values())
    return frozenset(lang for lang, f in freq.items() if f >= best - 0.5) if best >= _KNOWN_ZIPF else frozenset()


# In a language, words this frequent (the, of, on, one, ...) carry no content.
_FUNCTION_ZIPF = 6.0


@lru_cache(maxsize=65536)
def is_function_word(word: str, language: str = "en") -> bool:
    """Whether a casefolded word is one of `language`'s function words (the, of, on; der, im, und)."""
    from wordfreq import zipf_frequency

    return zipf_frequency(word, language) >= _FUNCTION_ZIPF


def words_of(text: str, casefold: bool = True) -> list[str]:
    """The text's words, casefolded unless asked not to, from its NFKC form (fullwidth letters are words
    wordfreq knows)."""
    text = unicodedata.normalize("NFKC", text)
    return _WORD.findall(text.casefold() if casefold else text)


def language_shares(text: str) -> dict[str, float] | None:
    """For each language, the share of the text's known words that belong to it; None under 3 known words.

    Names, file names and other words no language knows are left out, so they
    neither make nor break a language.
    """
    known = [langs for langs in map(languages_of, words_of(text)) if langs]
    if len(known) < 3:
        return None
    return {lang: sum(lang in langs for langs in known) / len(known) for lang in LANGUAGES}


def main_language(text: str, min_share: float = 0.6) -> str | None:
    """The language most of the text's known words belong to, if at least `min_share` do; else None."""
    shares = language_shares(text)
    if not shares:
        return None
    lang = max(shares, key=shares.get)
    return lang if shares[lang] >= min_share else None


def likely_languages(words: Iterable[str]) -> frozenset[str]:
    """The languages most of these words belong to, ties kept; empty when wordfreq knows none of them.

    For a text too short for `main_language`: "orange cat" is English only
    (orange is French and German too, cat is not), "chat orange" is any of the
    languages both words belong to.
    """
    counts = collections.Counter(lang for word in words for lang in languages_of(word))
    top = max(counts.values(), default=0)
    return frozenset(lang for lang, n in counts.items() if n == top)
