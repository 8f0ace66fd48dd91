"""Ingest over a user's own Parquet shards: keys made for keyless rows, files beside the shards, damaged files."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.schema import SchemaError
from curation.shards import read_table
from pipelines import ingest


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_keys_made_for_keyless_shards_name_their_shard(tmp_path):
    """Row r of every shard made the same key: all but the first shard's were renamed, and an identical row
    at the same index was dropped as a duplicate key even with content dedup off."""
    (tmp_path / "in").mkdir()
    red, blue, green = _jpeg((200, 0, 0)), _jpeg((0, 0, 200)), _jpeg((0, 200, 0))
    pq.write_table(pa.table({"caption": ["a red cat", "a blue dog"], "image": [red, blue]}),
                   tmp_path / "in" / "part-00000.parquet")
    pq.write_table(pa.table({"caption": ["a red cat", "a green bird"], "image": [red, green]}),
                   tmp_path / "in" / "part-00001.parquet")
    result = ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                         "--no_dedup_sha256", "--no_dedup_url"])
    assert result.rejects == {} and result.manifest["stats"]["renamed_keys"] == 0
    assert read_table(result.output).column("key").to_pylist() == [
        "in-part-00000-000000000", "in-part-00000-000000001", "in-part-00001-000000000", "in-part-00001-000000001"]


def test_parquet_files_the_shards_leave_out_are_refused(tmp_path):
    (tmp_path / "in").mkdir()
    table = pa.table({"key": ["a"], "caption": ["a red square"], "image": [_jpeg((200, 0, 0))]})
    pq.write_table(table, tmp_path / "in" / "part-00000.parquet")
    pq.write_table(table, tmp_path / "in" / "extra-2024.parquet")
    with pytest.raises(ValueError, match=r"beside its part-NNNNN.parquet shards that would not be read "
                                         r"\(extra-2024.parquet\)"):
        ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    (tmp_path / "in" / "part-00000.parquet").unlink()  # files named otherwise are all read
    assert ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]).rows == 1


def test_a_damaged_input_shard_is_named(tmp_path):
    """Beam's error said only "Parquet magic bytes not found", naming no file."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"key": ["a"], "caption": ["a red square"], "image": [_jpeg((200, 0, 0))]}),
                   tmp_path / "in" / "part-00000.parquet")
    (tmp_path / "in" / "part-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match=r"not a readable Parquet file .*part-00001\.parquet"):
        ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])


def test_every_output_shard_has_the_same_extra_columns(tmp_path):
    """Each output shard carried its own input shard's extras: one without a column, or with it all null
    (type null), gave shards of other schemas, and pyarrow.dataset dropped those columns without a word."""
    import pyarrow.dataset as ds

    (tmp_path / "in").mkdir()
    colours = [(200, 0, 0), (0, 0, 200), (0, 200, 0)]
    extras = [{"license": pa.nulls(1)}, {"license": pa.array(["cc-by"]), "score": pa.array([1], pa.int32())},
              {"score": pa.array([2], pa.int64()), "original_key": pa.array(["k"])}]
    for i, (colour, columns) in enumerate(zip(colours, extras)):
        pq.write_table(pa.table({"key": [f"k{i}"], "caption": [f"caption {i}"], "image": [_jpeg(colour)],
                                 **columns}), tmp_path / "in" / f"part-0000{i}.parquet")
    result = ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    schemas = {str(pq.read_schema(p).remove_metadata()) for p in sorted((tmp_path / "out").glob("part-*.parquet"))}
    assert len(schemas) == 1
    table = ds.dataset(sorted(str(p) for p in (tmp_path / "out").glob("part-*.parquet"))).to_table()
    assert table.column("license").to_pylist() == [None, "cc-by", None]
    assert table.schema.field("score").type == pa.int64() and table.column("score").to_pylist() == [None, 1, 2]
    assert table.column("original_key").to_pylist() == [None, None, "k"] and result.rows == 3
    # A column another writer declared not null, which other shards lack; a shard without rows of another type.
    pq.write_table(pa.table({"key": ["k3"], "caption": ["caption 3"], "image": [_jpeg((3, 3, 3))], "tag": ["x"]},
                            schema=pa.schema([("key", pa.string()), ("caption", pa.string()), ("image", pa.binary()),
                                              pa.field("tag", pa.string(), nullable=False)])),
                   tmp_path / "in" / "part-00003.parquet")
    pq.write_table(pa.table({"key": pa.array([], pa.string()), "caption": pa.array([], pa.string()),
                             "image": pa.array([], pa.binary()), "score": pa.array([], pa.string())}),
                   tmp_path / "in" / "part-00004.parquet")
    again = ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out1")])
    table = read_table(again.output)
    assert table.column("tag").to_pylist() == [None, None, None, "x"] and table.schema.field("score").type == pa.int64()
    pq.write_table(pa.table({"key": ["k9"], "caption": ["caption 9"], "image": [_jpeg((9, 9, 9))],
                             "score": pa.array([[1]])}), tmp_path / "in" / "part-00005.parquet")
    with pytest.raises(SchemaError, match=r"extra column holds int64 in .*part-00002.parquet and list<element: "
                                          r"int64> here.*part-00005.parquet, column 'score'"):
        ingest.run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2")])
