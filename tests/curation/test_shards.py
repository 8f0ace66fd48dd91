import json

import pyarrow as pa
import pytest

from curation.schema import PAIR_SCHEMA, SchemaError
from curation.shards import (
    ManifestError, ShardWriter, finished_shards, iter_batches, read_table, verify_manifest, write_manifest,
)


def rows(n: int, start: int = 0, image_bytes: int = 10) -> list[dict]:
    return [{"key": f"k{i:05d}", "url": None, "caption": f"caption {i}", "image": bytes([i % 256]) * image_bytes,
             "width": 1, "height": 1, "sha256": "0" * 64, "source": "t"} for i in range(start, start + n)]


def write_all(directory, data: list[dict], **kwargs) -> list:
    writer = ShardWriter(directory, **kwargs)
    for chunk in range(0, len(data), 7):  # odd chunking, to cross shard boundaries mid-batch
        writer.write(data[chunk:chunk + 7])
    return writer.close()


def test_round_trip_with_deterministic_names_and_manifest(tmp_path):
    data = rows(95)
    shards = write_all(tmp_path, data, rows_per_shard=20)
    write_manifest(tmp_path, stage="unit", config={"a": 1}, shards=shards)
    assert [s.name for s in shards] == [f"part-0000{i}.parquet" for i in range(5)]
    assert [s.rows for s in shards] == [20, 20, 20, 20, 15]
    manifest = verify_manifest(tmp_path)
    assert manifest["rows"] == 95 and manifest["schema_version"] == "1.0"
    assert manifest["lineage"][-1]["config"] == {"a": 1}
    back = read_table(tmp_path)
    assert back.column("key").to_pylist() == [r["key"] for r in data]
    assert back.schema.equals(PAIR_SCHEMA, check_metadata=False)


def test_target_bytes_bounds_shard_size(tmp_path):
    shards = write_all(tmp_path, rows(200, image_bytes=1000), target_bytes=20_000)
    assert len(shards) >= 8
    sizes = [s.rows for s in shards[:-1]]
    assert max(sizes) - min(sizes) <= 8  # equal-sized rows give near-equal shards


def test_reader_streams_bounded_batches(tmp_path):
    write_all(tmp_path, rows(300), rows_per_shard=150)
    sizes = [batch.num_rows for _, batch in iter_batches(tmp_path, batch_rows=64)]
    assert max(sizes) <= 64 and sum(sizes) == 300


def test_resume_skips_finished_shards_without_duplicates(tmp_path):
    data = rows(100)
    first = ShardWriter(tmp_path, rows_per_shard=30)
    first.write(data[:75])  # three shards would be 90 rows: only two are complete, 15 rows pending are lost
    assert len(finished_shards(tmp_path)) == 2
    resumed = ShardWriter(tmp_path, rows_per_shard=30)
    assert resumed.resumed_rows == 60
    resumed.write(data)  # the caller replays the same stream from the start
    resumed.close()
    assert read_table(tmp_path).column("key").to_pylist() == [r["key"] for r in data]


def test_stale_temp_files_are_invisible_and_cleaned(tmp_path):
    write_all(tmp_path, rows(10), rows_per_shard=10)
    (tmp_path / ".part-00001.parquet.tmp-999").write_bytes(b"half written")
    assert [p.name for p in finished_shards(tmp_path)] == ["part-00000.parquet"]
    ShardWriter(tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))


def test_tampered_shard_fails_checksum(tmp_path):
    shards = write_all(tmp_path, rows(20), rows_per_shard=10)
    write_manifest(tmp_path, stage="unit", config={}, shards=shards)
    path = tmp_path / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="part-00001.parquet does not match"):
        verify_manifest(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("shards"), r"no list of shards"),
    (lambda m: m.update(shards={"part-00000.parquet": {}}), r"no list of shards"),
    (lambda m: m["shards"][1].pop("bytes"), r"shard 1 of the manifest lacks a valid bytes"),
    (lambda m: m["shards"][0].update(sha256=None, name=3), r"shard 0 of the manifest lacks a valid name, sha256"),
    (lambda m: m["shards"].__setitem__(0, ["part-00000.parquet"]), r"shard 0 .* lacks a valid name, rows, bytes"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), r"lists part-00000.parquet more than once"),
    (lambda m: m.update(rows=19), r"says 19 rows, its shards 20"),
])
def test_a_manifest_a_reader_cannot_use_is_named_with_what_it_lacks(tmp_path, edit, message):
    """A hand-edited or foreign manifest failed as a bare KeyError or TypeError that named no file."""
    write_manifest(tmp_path, stage="unit", config={}, shards=write_all(tmp_path, rows(20), rows_per_shard=10))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=rf"manifest.json.*{message}|{message}"):
        read_table(tmp_path)


def test_an_unlisted_shard_and_a_wrong_row_count_are_refused(tmp_path):
    """A shard beside the manifest that it does not list was never read, silently; nor were row counts checked."""
    shards = write_all(tmp_path, rows(20), rows_per_shard=10)
    write_manifest(tmp_path, stage="unit", config={}, shards=shards[:1])
    with pytest.raises(ManifestError, match="holds part-00001.parquet, which its manifest does not list"):
        verify_manifest(tmp_path, checksums=False)
    write_manifest(tmp_path, stage="unit", config={}, shards=shards)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["rows"] = 12
    manifest["rows"] = 22  # an edit that kept the total in step
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    verify_manifest(tmp_path, checksums=False)  # sizes only: no footer is read
    with pytest.raises(ManifestError, match="part-00001.parquet holds 10 rows, its manifest 12"):
        verify_manifest(tmp_path)


def test_reader_refuses_duplicate_keys_across_shards(tmp_path):
    write_all(tmp_path, rows(10) + rows(5, start=3), rows_per_shard=10)
    with pytest.raises(SchemaError) as err:
        list(iter_batches(tmp_path))
    assert err.value.file.endswith("part-00001.parquet") and err.value.row == 1 and err.value.column == "key"
    assert "part-00000.parquet row 4 " in str(err.value)  # k00003, the fourth row of the first shard


def test_a_null_key_in_a_shard_s_first_row_is_row_1_as_in_a_rejects_table(tmp_path):
    """Refusals count rows from 1, as rejects do: the first row is never "row 0" in one and "row 1" in the other."""
    import pyarrow.parquet as pq
    data = rows(3)
    data[0]["key"] = None
    pq.write_table(pa.Table.from_pylist(data, schema=pa.schema([f.with_nullable(True) for f in PAIR_SCHEMA])),
                   tmp_path / "part-00000.parquet")
    with pytest.raises(SchemaError, match=r"null in a non-nullable column .*column 'key', row 1\)$") as err:
        list(iter_batches(tmp_path))
    assert err.value.row == 1


def test_reader_refuses_missing_column_naming_the_file(tmp_path):
    import pyarrow.parquet as pq
    core = pa.schema(list(PAIR_SCHEMA)[:8])
    pq.write_table(pa.Table.from_pylist(rows(3), schema=core).drop_columns(["caption"]), tmp_path / "part-00000.parquet")
    with pytest.raises(SchemaError, match="column 'caption'") as err:
        list(iter_batches(tmp_path))
    assert err.value.file.endswith("part-00000.parquet")


def test_invalid_writer_settings():
    with pytest.raises(ValueError, match="rows_per_shard"):
        ShardWriter("/tmp/never", rows_per_shard=0)


def test_manifest_is_valid_json_written_last(tmp_path):
    shards = write_all(tmp_path, rows(5), rows_per_shard=5)
    write_manifest(tmp_path, stage="unit", config={}, shards=shards, stats={"x": 1})
    assert json.loads((tmp_path / "manifest.json").read_text())["stats"] == {"x": 1}
