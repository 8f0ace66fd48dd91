import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.export import (
    MB, ExportConfig, check_matched_entries, cut_shards, estimated_row_bytes, export_schema, image_extension,
    order_shard, parquet_bytes, route_batch, row_group_slices, shard_of, shuffle_hashes, validate_training_table,
    webdataset_bytes, webdataset_key,
)
from curation.schema import SchemaError


def _rows(n: int, image_bytes: int = 1000) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.Table.from_pylist([{
        "key": f"k{i:05d}", "image": rng.bytes(image_bytes), "caption": f"caption {i}",
        "rewrites": [f"rewrite {i} a", f"rewrite {i} b"], "synthetic_caption": None, "fused_caption": f"fused {i}",
        "keep_prob": 0.5, "matched_entries": [i, i + 1],
    } for i in range(n)], schema=export_schema(ExportConfig().columns))


def test_config_enforces_the_byte_target_range_unless_small_shards_are_allowed():
    assert ExportConfig(target_bytes=64 * MB).target_bytes == 64 * MB
    with pytest.raises(ValueError, match="allow_small_shards"):
        ExportConfig(target_bytes=10 * MB)
    with pytest.raises(ValueError, match="outside"):
        ExportConfig(target_bytes=2048 * MB, small_shards=True)
    assert ExportConfig(target_bytes=100_000, small_shards=True).target_bytes == 100_000
    with pytest.raises(ValueError, match="cannot keep"):
        ExportConfig(keep_columns=("label",))
    assert ExportConfig(keep_columns=("source", "url")).columns[-2:] == ["url", "source"]


def test_shuffle_hashes_depend_on_seed_and_key_only():
    keys = [f"k{i}" for i in range(100)]
    a, b = shuffle_hashes(keys, 1), shuffle_hashes(list(reversed(keys)), 1)[::-1]
    assert a.dtype == np.uint64 and np.array_equal(a, b)
    assert not np.array_equal(a, shuffle_hashes(keys, 2))
    assert len(set(a.tolist())) == 100


def test_estimated_row_bytes_counts_every_exported_value():
    table = _rows(3, image_bytes=1000)
    sizes = estimated_row_bytes(table)
    # key 6 + image 1000 + caption "caption 0" 9 + rewrites 11+11 + fused 7 + keep_prob 4 + entries 2*4
    assert sizes[0] == 6 + 1000 + 9 + 22 + 7 + 4 + 8
    assert len(sizes) == 3


def test_cut_shards_ends_each_shard_within_one_row_of_a_multiple_of_the_target():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, 1000, dtype=np.uint64)
    sizes = rng.integers(100, 300, 1000)
    boundaries, rows, estimated = cut_shards(hashes, sizes, 5000)
    assert boundaries[0] == 0 and np.all(np.diff(boundaries.astype(np.float64)) > 0)
    assert rows.sum() == 1000 and estimated.sum() == sizes.sum()
    ends = np.cumsum(estimated)[:-1]  # shard k ends where the first row starting past (k+1) * target begins
    multiples = 5000 * np.arange(1, len(ends) + 1)
    assert np.all(ends >= multiples) and np.all(ends < multiples + 300)
    assert np.all(np.abs(estimated[:-1] - 5000) < 300)
    assigned = shard_of(hashes, boundaries)
    assert np.array_equal(np.bincount(assigned), rows)
    empty = cut_shards(np.zeros(0, np.uint64), np.zeros(0, np.int64), 5000)
    assert all(len(part) == 0 for part in empty)


def test_route_then_order_rebuilds_the_hash_order_whatever_the_batches():
    table = _rows(60, image_bytes=50)
    config = ExportConfig(seed=3)
    hashes = shuffle_hashes(table.column("key").to_pylist(), 3)
    boundaries, rows, _ = cut_shards(hashes, estimated_row_bytes(table), 800)
    parts: dict[int, list[pa.Table]] = {}
    for batch in table.to_batches(max_chunksize=7):
        for index, part in route_batch(batch, 3, boundaries):
            parts.setdefault(index, []).append(part)
    ordered = [order_shard(reversed(parts[i]), config) for i in sorted(parts)]
    assert [t.num_rows for t in ordered] == rows.tolist()
    keys = [k for t in ordered for k in t.column("key").to_pylist()]
    assert keys == [table.column("key")[int(i)].as_py() for i in np.argsort(hashes)]


def test_parquet_bytes_are_deterministic_and_cut_into_byte_sized_row_groups():
    table = _rows(40, image_bytes=1000)
    data = parquet_bytes(table, row_group_bytes=5000)
    assert data == parquet_bytes(table, row_group_bytes=5000)
    parquet = pq.ParquetFile(io.BytesIO(data))
    assert parquet.metadata.num_row_groups == len(row_group_slices(table, 5000)) >= 7
    assert parquet.read().equals(table)
    validate_training_table(parquet.schema_arrow)  # a schema carries no rows but is checked the same way
    assert parquet.metadata.row_group(0).column(1).statistics is None  # no image copies in the footer


def test_validate_training_table_names_a_missing_column():
    table = _rows(2).drop_columns(["fused_caption"])
    with pytest.raises(SchemaError, match="fused_caption"):
        validate_training_table(table, file="x.parquet")


def test_webdataset_members_are_grouped_by_key_with_fixed_metadata():
    table = _rows(3, image_bytes=10).set_column(1, "image", pa.array([b"\xff\xd8\xffxx", b"\x89PNG\r\n\x1a\nyy", b"?"]))
    table = table.set_column(0, "key", pa.array(["a-1", "b.2/x", "c_3"]))
    data = webdataset_bytes(table)
    assert data == webdataset_bytes(table)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[:3] == ["a-1.jpg", "a-1.txt", "a-1.json"]
        assert names[3].endswith(".png") and "." not in names[3][:-4] and "/" not in names[3]
        assert names[6] == "c_3.jpg"
        assert {m.mtime for m in members} == {0}
        sidecar = json.loads(tar.extractfile(names[5]).read())
        assert sidecar["key"] == "b.2/x" and sidecar["rewrites"] == ["rewrite 1 a", "rewrite 1 b"]
        assert "image" not in sidecar


def test_image_extension_and_key_sanitising():
    assert image_extension(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert image_extension(b"GIF89a") == "gif"
    assert webdataset_key("demo-0-0000001") == "demo-0-0000001"
    assert webdataset_key("a.b") != webdataset_key("a_b") and "." not in webdataset_key("a.b")


def test_an_entry_id_that_names_no_metadata_entry_is_refused_with_its_row():
    """A null id crashed online curation mid-epoch; -1 was read as the last entry, silently."""
    lists = pa.array([[1, 2], [], None, [3, -1]], pa.list_(pa.int32()))
    batch = pa.RecordBatch.from_pydict({"matched_entries": lists})
    with pytest.raises(SchemaError, match=r"entry id -1 is no metadata entry.*row 14"):
        check_matched_entries(batch, "f.parquet", 10)
    sliced = pa.RecordBatch.from_pydict({"matched_entries": pa.array([[5], [1, 2], [None]], pa.list_(pa.int32()))})
    with pytest.raises(SchemaError, match=r"entry id None .*row 2"):  # rows of a slice count from the slice
        check_matched_entries(sliced.slice(1), "f.parquet", 0)
    check_matched_entries(pa.RecordBatch.from_pydict({"matched_entries": pa.array([[0], None], pa.list_(pa.int32()))}),
                          "f.parquet", 0)
