"""The counts and colours a caption states, which a rewrite or a fusion must keep, and not invent.

A trainer learns counts and colours from these texts, and the instruction
asks the model to keep them: "3 red circles" reworded as "5 blue circles" is
a wrong caption, however fluent (`curation.validation.changed_fact`). A
count may change its wording ("two" as "a pair"), a colour its shade
("crimson" for "red"), "black and white" may become "monochrome". A count
or colour the source does not state is invented: "a red circle" as "three
red circles", "one yellow pentagon" as "a sky blue triangle of one yellow
pentagon" (a quarter of the demo's kept rewrites did this, measured).
"""

from __future__ import annotations

import re

from curation.languages import words_of


# A number standing as a word: not one glued to letters, underscores, dots or colons (IMG_2231.jpg,
# 1920x1080, v2, 10:30), with its thousands separators and decimals (10,000 people; 3.5 stars).
_NUMBER = re.compile(r"(?<![\w.:])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w:]|\.\w)|(?<![\w.:])\d+(?:\.\d+)?(?![\w:]|\.\w)")
# Longer numbers are catalogue and stock-photo ids, which a rewrite drops with the rest of the credits.
_MAX_KEPT_DIGITS = 4
# Number words and what else says the same count ("a red circle" is one, "a pair of mugs" two).
_COUNTS = {
    1: ("one", "a", "an", "single", "lone"), 2: ("two", "pair", "couple", "both", "twin"), 3: ("three", "trio"),
    4: ("four",), 5: ("five",), 6: ("six",), 7: ("seven",), 8: ("eight",), 9: ("nine",), 10: ("ten",),
    11: ("eleven",), 12: ("twelve", "dozen"), 20: ("twenty",), 30: ("thirty",), 40: ("forty",), 50: ("fifty",),
    60: ("sixty",), 70: ("seventy",), 80: ("eighty",), 90: ("ninety",),
}
_COUNT_WORDS = {word: n for n, words in _COUNTS.items() for word in words[:1]}  # what states a count
_COUNT_SAYERS = {word: n for n, words in _COUNTS.items() for word in words}     # what may carry it on
# Colour words, each to its family: a rewrite may say "crimson" for "red", not "blue".
_COLOURS = {c: c for c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
                           "grey", "gold", "silver", "beige", "teal", "turquoise", "maroon", "cyan", "magenta")} | {
    "gray": "grey", "golden": "gold", "crimson": "red", "scarlet": "red", "ruby": "red", "navy": "blue",
    "azure": "blue", "cobalt": "blue", "emerald": "green", "lime": "green", "violet": "purple",
    "lavender": "purple", "ivory": "white", "charcoal": "grey"}
# Words that say several colours at once: "black and white" may become "monochrome".
_COLOUR_SETS = {word: ("black", "white", "grey") for word in ("monochrome", "greyscale", "grayscale")}
# Colour words that are as often things (an orange, gold, a golden retriever): kept in an output, never asked.
_AMBIGUOUS_COLOURS = frozenset({"orange", "gold", "golden"})


def _counts(text: str, words: dict[str, int]) -> frozenset[str]:
    """The counts a text states: its free-standing numbers of up to four digits (10,000 as 10000, 3.0 as 3),
    and the number words among `words` ("one" of "one of the best" is no count)."""
    numbers = set()
    for match in _NUMBER.findall(text):
        value = float(match.replace(",", ""))
        if len(match.replace(",", "").split(".")[0]) <= _MAX_KEPT_DIGITS:
            numbers.add(str(int(value)) if value.is_integer() else repr(value))
    tokens = words_of(text)
    said = {str(words[w]) for w, after in zip(tokens, [*tokens[1:], ""]) if w in words and not (w == "one" and
                                                                                                  after == "of")}
    return frozenset(numbers | said)


def stated_counts(text: str) -> frozenset[str]:
    """The counts a source states, by number or number word ("one" of "one of the best" is no count)."""
    return _counts(text, _COUNT_WORDS)


def stated_colours(text: str) -> frozenset[str]:
    """The colour families a source names, less the words as often things ("an orange")."""
    return frozenset(_COLOURS[w] for w in words_of(text) if w in _COLOURS and w not in _AMBIGUOUS_COLOURS)


def lost_fact(counts: frozenset[str], colours: frozenset[str], output: str) -> bool:
    """Whether `output` lost one of a source's `counts` or `colours` (`stated_counts`, `stated_colours`)."""
    if counts - _counts(output, _COUNT_SAYERS):
        return True
    words = words_of(output)
    kept = {_COLOURS[w] for w in words if w in _COLOURS}
    for word in words:  # "monochrome" says "black and white", not "black" alone (a black cat is no grey one)
        named = set(_COLOUR_SETS.get(word, ()))
        if len(colours & named) >= 2 and colours <= named | kept:
            kept |= named
    return not colours <= kept


def added_fact(source: str, output: str) -> bool:
    """Whether `output` states a count or a colour family that `source` does not: a number or number word
    no wording of the source's counts says ("a" is one, "a pair" two), or a colour outside the source's
    families ("monochrome" allows black, white and grey). Colour words as often things stay free."""
    # Any digits of the source allow their number: "half past ten" for 10:30, "the 2231st" for IMG_2231.
    digits = {str(int(d)) for d in re.findall(r"\d+", source)}
    if _counts(output, _COUNT_WORDS) - _counts(source, _COUNT_SAYERS) - digits:
        return True
    words = words_of(source)
    allowed = {_COLOURS[w] for w in words if w in _COLOURS} | {c for w in words for c in _COLOUR_SETS.get(w, ())}
    return any(_COLOURS[w] not in allowed for w in words_of(output) if w in _COLOURS and w not in _AMBIGUOUS_COLOURS)
