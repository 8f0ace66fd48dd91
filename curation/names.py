"""What an alt-text names (people, places, brands, years), and whether a fusion of it kept them.

VeCLIP's fusion is there to keep the alt-text's knowledge, so a VeCap that drops
a name is refused. Which words are names is read from their shape:

- years (1800 to 2099), anywhere;
- acronyms (BMW, NASA: two or more capitals) and mixed case (iPhone,
  McDonald's, YouTube), anywhere but in an ALL-CAPS text; shop shouting and
  file tags in capitals ("NEW", "FREE SHIPPING", "HD", "PNG") are no names;
- capitalised words inside a sentence, in a text written in sentence case.

Capitals say less where every content word has one (Title Case: "Old Ford
Truck On Our Farm In Texas"). There a word the VeC uses too ("truck") is a
description of what is seen, and a fusion must keep half of the other
capitalised words (rounded up), not all. In German every noun has a capital
and a fusion may translate it, so there only shape names count. Function
words (On, Our, The) are never names, and a name counts as kept only as a
whole word, in any case: "afford" does not keep Ford.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from curation.languages import is_function_word, main_language, words_of

_JOINERS = re.compile(r"[-'’]")  # inside one name: Coca-Cola, O'Brien
_YEAR = re.compile(r"^(1[89]\d\d|20\d\d)$")
_POSSESSIVE = re.compile(r"['’]s$")
_SENTENCE_END = (".", "!", "?", ":", "|", "-", "–", "—", "•")
_PUNCTUATION = "\"'“”‘’()[]{},;!?.:"
# Content words, all capitalised, that make a text Title Case rather than a run of names ("Jane Doe").
_TITLE_CASE_WORDS = 4
# Words web alt-text writes in capitals for emphasis or as a file tag, not as an acronym: a fusion that
# says "free shipping" or drops "PNG" lost no name.
_SHOUTED = frozenset("""
    NEW SALE FREE SHIPPING HOT BEST TOP OFF BUY NOW SHOP DEAL DEALS OFFER CHEAP DISCOUNT LIMITED EDITION GIFT
    GIFTS MEN WOMEN KIDS BABY SET PACK LOT SIZE COLOR COLOUR STOCK PHOTO IMAGE VECTOR ICON LOGO ART CLIPART
    WALLPAPER FULL PREMIUM ORIGINAL OFFICIAL AUTHENTIC GENUINE QUALITY LUXURY VINTAGE RETRO WHOLESALE
    HD UHD FHD HQ PNG JPG JPEG GIF SVG PDF EPS PSD WEBP TIFF
""".split())


@dataclass(frozen=True)
class Names:
    """An alt-text's names: those a fusion must keep, and the capitalised words of which it must keep half."""

    required: tuple[str, ...] = ()
    capitalised: tuple[str, ...] = ()

    @property
    def capitalised_needed(self) -> int:
        return -(-len(self.capitalised) // 2)

    def lost_in(self, text: str) -> list[str]:
        """The names `text` does not keep, where that is too many; [] when it keeps enough."""
        lost = [name for name in self.required if not _holds(text, name)]
        dropped = [word for word in self.capitalised if not _holds(text, word)]
        if len(self.capitalised) - len(dropped) < self.capitalised_needed:
            lost += dropped
        return lost


def _parts(word: str) -> list[str]:
    return _JOINERS.split(word)


def _is_word(word: str) -> bool:
    """Letters only (any script), hyphens and apostrophes inside: Zürich, Coca-Cola, O'Brien; not IMG_0042."""
    return all(part.isalpha() for part in _parts(word))


def _capitalised(word: str) -> bool:
    """Each part a capital then small letters (São, Coca-Cola, O'Brien), so not an acronym or mixed case."""
    return all(part[0].isupper() and (len(part) == 1 or part[1:].islower()) for part in _parts(word))


def _by_shape(word: str) -> bool:
    """An acronym (BMW, NASA) or mixed case (iPhone, McDonald, YouTube): a name whatever its place."""
    letters = word.replace("-", "")
    acronym = len(letters) >= 2 and letters.isupper() and letters not in _SHOUTED
    return acronym or any(a.islower() and b.isupper() for a, b in zip(word, word[1:]))


def names_in(alt_text: str, seen: str = "") -> Names:
    """The names in `alt_text`, each once, in order; `seen` is the VeC (see the module docstring)."""
    language = main_language(alt_text) or "en"
    all_caps = alt_text.isupper()
    found: dict[str, bool] = {}  # name: whether its shape alone makes it one (a year, an acronym)
    content_words = content_capitals = 0
    tokens = alt_text.split()
    for i, token in enumerate(tokens):
        word = _POSSESSIVE.sub("", token.strip(_PUNCTUATION))
        if _YEAR.match(word):
            found.setdefault(word, True)
        if not _is_word(word):
            continue  # file names (IMG_0042.jpg), numbers, symbols
        function = is_function_word(word.casefold(), language)
        content_words += not function
        content_capitals += not function and word[0].isupper()
        starts_sentence = i == 0 or tokens[i - 1].endswith(_SENTENCE_END) or tokens[i - 1] in _SENTENCE_END
        if all_caps or function:
            continue
        if _by_shape(word):
            found.setdefault(word, True)
        elif not starts_sentence and _capitalised(word):
            found.setdefault(word, False)
    shaped = tuple(w for w, by_shape in found.items() if by_shape)
    if language == "de":
        return Names(shaped)
    if content_words >= _TITLE_CASE_WORDS and content_capitals == content_words:
        described = {w.casefold() for w in words_of(seen)}
        return Names(shaped, tuple(w for w, by_shape in found.items()
                                   if not by_shape and w.casefold() not in described))
    return Names(tuple(found))


def _holds(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None
