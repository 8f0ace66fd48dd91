"""A stage's check of its input shards: columns, types, null and repeated keys, each named with its file."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.input_check import InputCheck, is_bytes, is_text
from curation.schema import SchemaError

CHECK = InputCheck("caption", "pair shards with images", {"caption": is_text, "image": is_bytes})


def _shard(path, keys, captions=None, images=None):
    columns = {"key": keys, "caption": captions or [f"c {k}" for k in keys], "image": images or [b"x"] * len(keys)}
    pq.write_table(pa.table(columns), path)
    return path


def test_good_shards_pass_and_a_key_in_two_shards_is_named_where_it_was_first(tmp_path):
    first, second = _shard(tmp_path / "a.parquet", ["k1", "k2"]), _shard(tmp_path / "b.parquet", ["k3"])
    CHECK([first, second])
    third = _shard(tmp_path / "c.parquet", ["k4", "k2"])
    with pytest.raises(SchemaError, match=r"duplicate key 'k2', first seen in .*a.parquet row 2.*c.parquet.*row 2"):
        CHECK([first, second, third])


@pytest.mark.parametrize("columns, message", [
    ({"key": ["k1"], "caption": ["c"]}, r"missing column\(s\) image; caption reads pair shards with images"),
    ({"key": ["k1"], "caption": [3], "image": [b"x"]}, r"column holds int64, which caption cannot read.*caption"),
    ({"key": ["k1", None], "caption": ["c", "d"], "image": [b"x", b"y"]}, r"no key \(1 null in all\).*row 2"),
    ({"key": [1], "caption": ["c"], "image": [b"x"]}, r"column holds int64.*key"),
])
def test_what_the_stage_cannot_read_is_named(tmp_path, columns, message):
    pq.write_table(pa.table(columns), tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=message) as info:
        CHECK([tmp_path / "bad.parquet"])
    assert "bad.parquet" in str(info.value)


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(SchemaError, match=r"not a readable Parquet file.*empty.parquet"):
        CHECK([tmp_path / "empty.parquet"])


def test_a_column_every_row_must_fill_is_checked_for_nulls():
    """The caption stage's fusion crashed on a null alt-text after every image was captioned, naming no row."""
    import tempfile
    from pathlib import Path

    from pipelines.caption import INPUT_CHECK

    with tempfile.TemporaryDirectory() as tmp:
        good = _shard(Path(tmp) / "good.parquet", ["k1"])
        bad = _shard(Path(tmp) / "bad.parquet", ["k2", "k3", "k4"], captions=["c", None, None])
        CHECK([bad])  # a check without not_null lets it through
        with pytest.raises(SchemaError, match=r"no caption \(2 null in all\); caption needs one in every row "
                                              r"\(file .*bad.parquet, column 'caption', row 2\)"):
            INPUT_CHECK([good, bad])
