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


# MetaCLIP 2's `is_cjk_or_similar` as its code states it: these blocks, ASCII punctuation, and its full-width list.
METACLIP2_BLOCKS = {
    "CJK Unified Ideographs": (0x4E00, 0x9FFF), "Extension A": (0x3400, 0x4DBF), "Extension B": (0x20000, 0x2A6DF),
    "Extension C": (0x2A700, 0x2B73F), "Extension D": (0x2B740, 0x2B81F), "Extension E": (0x2B820, 0x2CEAF),
    "Extension F": (0x2CEB0, 0x2EBEF), "Compatibility Ideographs": (0xF900, 0xFAFF),
    "Radicals Supplement": (0x2E80, 0x2EFF), "Kangxi Radicals": (0x2F00, 0x2FDF),
    "Ideographic Description Characters": (0x2FF0, 0x2FFF), "Thai": (0x0E00, 0x0E7F), "Lao": (0x0E80, 0x0EFF),
    "Myanmar": (0x1000, 0x109F), "Khmer": (0x1780, 0x17FF), "Tibetan": (0x0F00, 0x0FFF),
}
METACLIP2_PUNCTUATION = "，。、；：？！“”‘’（）【】《》〈〉「」『』～—"


def metaclip2_key(entry: str) -> str:
    """MetaCLIP 2's padding: a space on a side only if that character is in none of its blocks and no
    punctuation."""
    import string

    def unspaced(char: str) -> bool:
        code = ord(char)
        return (any(low <= code <= high for low, high in METACLIP2_BLOCKS.values())
                or char in string.punctuation or char in METACLIP2_PUNCTUATION)

    return ("" if unspaced(entry[0]) else " ") + entry + ("" if unspaced(entry[-1]) else " ")


def naive_match_metaclip2(entries: list[str], text: str | None) -> list[int] | None:
    """MetaCLIP 2's matching by a loop of `in` tests: each entry padded by `metaclip2_key`."""
    return naive_match_keys([metaclip2_key(entry) for entry in entries], text)


def naive_match_keys(keys: list[str], text: str | None) -> list[int] | None:
    """The loop of `in` tests over entries already padded (padded once, as MetaCLIP 2's own loop does: per
    caption, the padding cost ~30x the matching)."""
    if text is None:
        return None
    spaced = metaclip_spacing(text)
    return [i for i, key in enumerate(keys) if key in spaced]
