"""MetaCLIP's two matching methods, written from the spec, as references for the tests and the benchmark.

Not the project's code: `curation.matching` computes the same sets another way, and is checked against these.
"""

from __future__ import annotations

import ahocorasick


def metaclip_spacing(text: str) -> str:
    """MetaCLIP's spacing with plain str.replace: punctuation padded with spaces, tab/newline/CR to spaces."""
    text = f" {text} "
    for char in ",.;:?!`":
        text = text.replace(char, f" {char} ")
    for char in "\t\n\r":
        text = text.replace(char, " ")
    return text


def naive_match(entries: list[str], text: str | None, case_fold: bool = False) -> list[int] | None:
    """The first MetaCLIP release: `" entry " in spaced_text` for every entry."""
    if text is None:
        return None
    if case_fold:  # case variants are one entry, its first id
        text = text.lower()
        first = {}
        for i, entry in enumerate(entries):
            first.setdefault(entry.lower(), i)
        entries = [e.lower() if first[e.lower()] == i else None for i, e in enumerate(entries)]
    spaced = metaclip_spacing(text)
    return [i for i, entry in enumerate(entries) if entry is not None and f" {entry} " in spaced]


def metaclip_automaton(entries: list[str], metaclip2_padding: bool = False) -> ahocorasick.Automaton:
    """MetaCLIP's current index: one pyahocorasick automaton over `" entry "` (MetaCLIP 2: `metaclip2_key`),
    valued by entry id."""
    automaton = ahocorasick.Automaton()
    for i, entry in enumerate(entries):
        automaton.add_word(metaclip2_key(entry) if metaclip2_padding else f" {entry} ", i)
    automaton.make_automaton()
    return automaton


def automaton_match(automaton: ahocorasick.Automaton, text: str) -> list[int]:
    """MetaCLIP's per-caption loop: one `iter` call over the spaced caption, ids sorted and unique."""
    return sorted({value for _, value in automaton.iter(metaclip_spacing(text))})


def metaclip2_key(entry: str) -> str:
    """MetaCLIP 2's padding, written from the spec: a space on a side only if that character is not
    CJK-or-similar (the spec's scripts, kana, ASCII or full-width punctuation)."""
    import string
    import unicodedata

    def unspaced(char: str) -> bool:
        name = unicodedata.name(char, "")
        scripts = ("CJK", "THAI", "LAO", "MYANMAR", "KHMER", "TIBETAN", "HIRAGANA", "KATAKANA", "KANGXI",
                   "IDEOGRAPHIC DESCRIPTION")
        return (name.startswith(scripts) or char in string.punctuation
                or char in "，。、；：？！“”‘’（）【】《》〈〉「」『』～—")

    return ("" if unspaced(entry[0]) else " ") + entry + ("" if unspaced(entry[-1]) else " ")


def naive_match_metaclip2(entries: list[str], text: str | None) -> list[int] | None:
    """MetaCLIP 2's matching by a loop of `in` tests: each entry padded by `metaclip2_key`."""
    if text is None:
        return None
    spaced = metaclip_spacing(text)
    return [i for i, entry in enumerate(entries) if metaclip2_key(entry) in spaced]
