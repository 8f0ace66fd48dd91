import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.schema import PAIR_SCHEMA, SCHEMA_VERSION_KEY, KeyTracker, SchemaError, conform, validate


def pair(key: str, **overrides) -> dict:
    row = {"key": key, "url": None, "caption": "a red circle", "image": b"\xff\xd8", "width": 4, "height": 4,
           "sha256": "0" * 64, "source": "test"}
    row.update(overrides)
    return row


def table(*rows: dict) -> pa.Table:
    return conform(pa.Table.from_pylist(list(rows), schema=pa.schema([f for f in PAIR_SCHEMA][:8])))


def test_conformed_table_is_valid_and_has_every_stage_column():
    t = table(pair("a"), pair("b"))
    validate(t, file="x.parquet")
    assert t.column_names[:13] == PAIR_SCHEMA.names
    assert t.column("rewrites").null_count == 2
    assert t.schema.metadata[SCHEMA_VERSION_KEY] == b"1.0"


def test_missing_core_column_names_file_and_column():
    t = table(pair("a")).drop_columns(["sha256"])
    with pytest.raises(SchemaError) as err:
        validate(t, file="shard-7.parquet")
    assert err.value.column == "sha256" and err.value.file == "shard-7.parquet"
    assert "shard-7.parquet" in str(err.value) and "sha256" in str(err.value)


def test_mistyped_column_is_refused():
    t = table(pair("a"))
    t = t.set_column(t.column_names.index("width"), "width", pa.array(["4"]))
    with pytest.raises(SchemaError, match="column 'width'") as err:
        validate(t, file="f.parquet")
    assert "expected int32" in str(err.value)


def test_null_in_required_column_names_row():
    rows = [pair(str(i)) for i in range(5)]
    t = pa.Table.from_pylist(rows, schema=pa.schema([f.with_nullable(True) for f in PAIR_SCHEMA][:8]))
    caption = t.column("caption").to_pylist()
    caption[3] = None
    t = conform(t.set_column(2, "caption", pa.array(caption)))
    with pytest.raises(SchemaError) as err:
        validate(t, file="f.parquet", row_offset=100)
    assert (err.value.column, err.value.row) == ("caption", 104)  # 0-based offset 100, fourth row


def test_duplicate_key_across_tables_names_both_places(tmp_path):
    keys = KeyTracker.new()
    for name, rows in (("one.parquet", [pair("a"), pair("b")]), ("two.parquet", [pair("c"), pair("a")])):
        pq.write_table(table(*rows), tmp_path / name)
        validate(pq.read_table(tmp_path / name), file=str(tmp_path / name), keys=keys)
    with pytest.raises(SchemaError) as err:
        keys.check()  # once every key is in
    assert err.value.row == 2 and err.value.file == str(tmp_path / "two.parquet")
    assert "one.parquet row 1 " in str(err.value) and "'a'" in str(err.value)
    with pytest.raises(SchemaError, match=r"duplicate key 'x'.*this table row 1 .*row 2\)"):
        validate(table(pair("x"), pair("x")))  # within one table: at once


def test_a_shared_hash_is_not_a_duplicate_key(monkeypatch):
    """64-bit hashes of different keys can be equal: the keys themselves decide."""
    import curation.schema

    class SameDigest:
        def __init__(self, data, digest_size):
            pass

        def digest(self):
            return bytes(8)

    monkeypatch.setattr(curation.schema.hashlib, "blake2b", SameDigest)
    keys = KeyTracker.new()
    keys.add(["a", "b", "c"], None)
    keys.check()  # every hash equal, no key twice
    keys.add(["b"], None, 3)
    with pytest.raises(SchemaError, match="duplicate key 'b'"):
        keys.check()


def test_incompatible_schema_version_is_refused():
    t = table(pair("a"))
    t = t.replace_schema_metadata({SCHEMA_VERSION_KEY: b"2.0"})
    with pytest.raises(SchemaError, match="schema version 2.0"):
        validate(t)


def test_extra_columns_are_kept_after_the_schema_columns():
    t = pa.Table.from_pylist([{**pair("a"), "license": "cc-by"}],
                             schema=pa.schema([*list(PAIR_SCHEMA)[:8], pa.field("license", pa.string())]))
    t = conform(t)
    validate(t)
    assert t.column_names[-1] == "license"
