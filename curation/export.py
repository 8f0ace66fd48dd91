"""Export: the final pairs as shuffled, size-bounded training shards (Parquet, and a WebDataset twin).

Unlike the other stages, output shards are not 1:1 with input shards. The
global order is a sort by a hash of (seed, key), and shard boundaries are cut
where the cumulative *estimated* row size crosses a multiple of the byte
target. Both depend only on the input rows, the seed and the config, never on
the runner or on which shards a previous, killed run already wrote, so a
rerun that skips finished shards produces byte-identical files.

The size estimate is the encoded size of the exported columns (image bytes,
UTF-8 text, 4 bytes per number). Images are already compressed and are stored
uncompressed, text is zstd-compressed, so a file comes out a little smaller
than its estimate (a few percent on JPEG-dominated data).

This module is pure: pyarrow, numpy and the standard library.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.languages import word_count
from curation.schema import PAIR_FIELDS, PAIR_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY, SchemaError, conform
from curation.shards import (
    ManifestError, ShardInfo, atomic_write_bytes, file_sha256, iter_batches, shard_paths, verify_manifest,
)

STAGE = "export"
MB = 1024 * 1024

TRAINING_COLUMNS: tuple[str, ...] = (
    "key", "image", "caption", "rewrites", "synthetic_caption", "fused_caption", "keep_prob", "matched_entries",
)
# Kept only on request: provenance columns training does not read.
OPTIONAL_COLUMNS: tuple[str, ...] = ("url", "sha256", "source", "width", "height")

MIN_TARGET_BYTES = 64 * MB  # the range open_clip users ask for
MAX_TARGET_BYTES = 1024 * MB
DEFAULT_TARGET_BYTES = 256 * MB
SMALL_TARGET_FLOOR = 4 * 1024  # with small_shards (tests, demo) the target may go down to this
DEFAULT_ROW_GROUP_BYTES = 32 * MB

WEBDATASET_DIR = "webdataset"
PLAN_FILE = "_export_plan.json"

_SAFE_WDS_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"),
)


@dataclass(frozen=True)
class ExportConfig:
    """Everything that decides the exported bytes; the CLI and Dagster both build this."""

    seed: int = 0
    target_bytes: int = DEFAULT_TARGET_BYTES
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES
    keep_columns: tuple[str, ...] = ()
    webdataset: bool = False
    small_shards: bool = False  # allow a byte target under 64 MB (tests and the demo)

    def __post_init__(self) -> None:
        low = SMALL_TARGET_FLOOR if self.small_shards else MIN_TARGET_BYTES
        if not low <= self.target_bytes <= MAX_TARGET_BYTES:
            hint = "" if self.small_shards else " (pass small_shards / --allow_small_shards for tests and demos)"
            raise ValueError(f"shard byte target {self.target_bytes} is outside [{low}, {MAX_TARGET_BYTES}]{hint}")
        if self.row_group_bytes <= 0:
            raise ValueError(f"row_group_bytes must be positive, got {self.row_group_bytes}")
        unknown = [c for c in self.keep_columns if c not in OPTIONAL_COLUMNS]
        if unknown:
            raise ValueError(f"cannot keep column(s) {unknown}: optional columns are {list(OPTIONAL_COLUMNS)}")
        object.__setattr__(self, "keep_columns", tuple(c for c in OPTIONAL_COLUMNS if c in self.keep_columns))

    @property
    def columns(self) -> list[str]:
        return [*TRAINING_COLUMNS, *self.keep_columns]


def export_schema(columns: Iterable[str]) -> pa.Schema:
    """The pair schema's fields for the exported columns, with the schema version in the metadata."""
    return pa.schema([PAIR_FIELDS[c] for c in columns], metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()})


def shuffle_hashes(keys: Iterable[str], seed: int) -> np.ndarray:
    """uint64 sort key per row: the shuffled order depends on (seed, key) only."""
    salt = int(seed).to_bytes(16, "big", signed=True)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest(), "big") for k in keys),
        dtype=np.uint64)


def _byte_lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def estimated_row_bytes(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """Encoded size of each row's exported columns: what the byte target is measured in."""
    n = table.num_rows
    total = np.zeros(n, dtype=np.int64)
    for name, column in zip(table.column_names, table.columns):
        kind = column.type
        if pa.types.is_binary(kind) or pa.types.is_string(kind):
            total += _byte_lengths(column)
        elif pa.types.is_list(kind):
            array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            flat = array.flatten()
            parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
            if pa.types.is_binary(kind.value_type) or pa.types.is_string(kind.value_type):
                weights = _byte_lengths(flat)
            else:
                weights = np.full(len(flat), kind.value_type.bit_width // 8, dtype=np.int64)
            total += np.bincount(parents, weights=weights, minlength=n).astype(np.int64)
        else:
            total += kind.bit_width // 8
    return total


@dataclass
class ExportPlan:
    """Where each shard starts in the hash order; the same input, seed and config give the same plan."""

    boundaries: list[int]  # lower hash bound of each shard (inclusive)
    shard_rows: list[int]
    shard_estimated_bytes: list[int]
    input_rows: int
    input_shards: int
    stats: dict = field(default_factory=dict)

    @property
    def shards(self) -> int:
        return len(self.boundaries)

    def to_json(self) -> dict:
        return {"boundaries": [str(b) for b in self.boundaries], "shard_rows": self.shard_rows,
                "shard_estimated_bytes": self.shard_estimated_bytes, "input_rows": self.input_rows}


def shard_of(hashes: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Index of the shard each hash falls in (boundaries sorted, boundaries[0] == 0)."""
    return np.searchsorted(boundaries, hashes, side="right") - 1


def cut_shards(hashes: np.ndarray, sizes: np.ndarray, target_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boundaries, rows per shard, estimated bytes per shard) for rows in hash order cut every target_bytes.

    A row belongs to the shard in which it *starts*, so every shard but the
    last holds target_bytes plus at most one row.
    """
    if not len(hashes):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes, sorted_sizes = hashes[order], sizes[order]
    starts = np.cumsum(sorted_sizes) - sorted_sizes
    first = np.flatnonzero(np.diff(starts // target_bytes, prepend=-1))
    boundaries = np.unique(sorted_hashes[first])
    boundaries[0] = 0
    assigned = shard_of(sorted_hashes, boundaries)
    rows = np.bincount(assigned, minlength=len(boundaries))
    estimated = np.bincount(assigned, weights=sorted_sizes, minlength=len(boundaries)).astype(np.int64)
    return boundaries, rows, estimated


def check_images(batch: pa.RecordBatch, file: str, row_offset: int) -> None:
    """A pair without image bytes cannot be trained on: name the row (1-based) rather than export it.

    `row_offset` is the 0-based place of the batch's first row in `file`."""
    empty = pc.equal(pc.binary_length(batch.column(batch.schema.get_field_index("image"))), 0)
    if pc.any(empty).as_py():
        row = pc.index(empty, True).as_py()
        raise SchemaError("missing image (zero bytes)", file=file, column="image", row=row_offset + row + 1)


def check_keep_probs(batch: pa.RecordBatch, file: str, row_offset: int) -> None:
    """A keep probability is a number in [0, 1]: a NaN one would sample nothing in training, and its
    WebDataset sidecar would not be JSON. The row (1-based) is named, as `check_images` does."""
    if "keep_prob" not in batch.schema.names:
        return
    column = batch.column(batch.schema.get_field_index("keep_prob"))
    values = column.fill_null(0.0).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~((values >= 0) & (values <= 1)))  # NaN fails both comparisons; a null is no value
    if len(bad):
        raise SchemaError(f"keep_prob {values[bad[0]]} is not in [0, 1]", file=file, column="keep_prob",
                          row=row_offset + int(bad[0]) + 1)


def check_matched_entries(batch: pa.RecordBatch, file: str, row_offset: int) -> None:
    """An entry id is a place in the metadata: a null one crashed online curation mid-epoch, and -1 was
    read as the last entry, curating by another entry's count, silently. The row (1-based) is named."""
    if "matched_entries" not in batch.schema.names:
        return
    lists = batch.column(batch.schema.get_field_index("matched_entries"))
    ids = pc.list_flatten(lists)
    bad = pc.or_kleene(pc.is_null(ids), pc.less(ids, 0))
    if pc.any(bad).as_py():
        at = pc.index(bad, True).as_py()
        ends = lists.offsets.to_numpy()[1:] - lists.offsets[0].as_py()  # a sliced batch's offsets start past 0
        row = int(np.searchsorted(ends, at, side="right"))  # the list holding id `at`
        raise SchemaError(f"matched entry id {ids[at].as_py()} is no metadata entry (ids are 0 and up)", file=file,
                          column="matched_entries", row=row_offset + row + 1)


def plan_export(input_dir: str | Path, config: ExportConfig, batch_rows: int = 1024) -> ExportPlan:
    """Validate every input row (schema, nulls, duplicate keys, missing images, keep probabilities, entry
    ids) and cut the shards.

    Raises SchemaError (or ManifestError from the caller's checksum check)
    before a single output byte is written. Keeps 24 bytes per row in memory: each row's shuffle hash and
    size, and the key check's hash (curation.schema.KeyTracker)."""
    hashes, sizes = [], []
    offsets: dict[Path, int] = {}
    inputs = shard_paths(input_dir)
    for path, batch in iter_batches(inputs, batch_rows=batch_rows):
        offset = offsets.get(path, 0)
        check_images(batch, str(path), offset)
        check_keep_probs(batch, str(path), offset)
        check_matched_entries(batch, str(path), offset)
        offsets[path] = offset + batch.num_rows
        hashes.append(shuffle_hashes(batch.column(batch.schema.get_field_index("key")).to_pylist(), config.seed))
        sizes.append(estimated_row_bytes(conform(pa.Table.from_batches([batch])).select(config.columns)))
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    all_sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    boundaries, rows, estimated = cut_shards(all_hashes, all_sizes, config.target_bytes)
    return ExportPlan([int(b) for b in boundaries], rows.tolist(), estimated.tolist(), int(len(all_hashes)),
                      len(inputs), stats={"estimated_bytes": int(all_sizes.sum())})


def route_batch(batch: pa.RecordBatch | pa.Table, seed: int, boundaries: np.ndarray,
                wanted: frozenset[int] | None = None) -> Iterable[tuple[int, pa.Table]]:
    """Split a batch into (shard index, rows of that shard), skipping shards not in `wanted`."""
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    if not table.num_rows:
        return
    shards = shard_of(shuffle_hashes(table.column("key").to_pylist(), seed), boundaries)
    for index in np.unique(shards).tolist():
        if wanted is None or index in wanted:
            yield index, table.take(np.flatnonzero(shards == index))


def order_shard(parts: Iterable[pa.Table], config: ExportConfig) -> pa.Table:
    """One shard's rows, in the global shuffled order (hash, then key for ties), cast to the export schema."""
    parts = list(parts)
    schema = export_schema(config.columns)
    if not parts:
        return schema.empty_table()
    table = pa.concat_tables([conform(p).select(config.columns) for p in parts], promote_options="default")
    table = table.append_column("_order", pa.array(shuffle_hashes(table.column("key").to_pylist(), config.seed)))
    table = table.sort_by([("_order", "ascending"), ("key", "ascending")]).drop_columns(["_order"])
    return table.cast(schema)


def row_group_slices(table: pa.Table, row_group_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each row group: cut by cumulative estimated bytes, at least one row each."""
    if not table.num_rows:
        return [(0, 0)]
    sizes = estimated_row_bytes(table)
    group = (np.cumsum(sizes) - sizes) // row_group_bytes
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    ends = np.append(starts[1:], table.num_rows)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


def leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet's names of the schema's leaf columns, which its per-column options take: a list column's
    is "rewrites.list.element" (named "rewrites", the options never reached it)."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    written = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [written.column(i).path for i in range(len(written))]


def parquet_bytes(table: pa.Table, row_group_bytes: int) -> bytes:
    """The shard file: images stored as is (already compressed), everything else zstd, with statistics
    (the trainer tells from them, without reading data, which columns hold values)."""
    leaves = leaf_paths(table.schema)
    compression = {leaf: ("none" if leaf == "image" else "zstd") for leaf in leaves}
    dictionary = [name for name in ("source",) if name in table.column_names]  # few distinct values
    # Min/max statistics of the image column would copy two whole images into every page header and footer.
    statistics = [leaf for leaf in leaves if leaf != "image"]
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression=compression, use_dictionary=dictionary,
                          write_statistics=statistics) as writer:
        for offset, length in row_group_slices(table, row_group_bytes):
            writer.write_table(table.slice(offset, length), row_group_size=max(length, 1))
    return sink.getvalue().to_pybytes()


def image_extension(data: bytes) -> str:
    """Extension webdataset decoders key on; PIL sniffs the content anyway, so unknown formats stay .jpg."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, extension in _IMAGE_MAGIC:
        if data.startswith(magic):
            return extension
    return "jpg"


def webdataset_key(key: str) -> str:
    """The tar member stem: webdataset groups members by the text before the first dot, so no dots or slashes."""
    if _SAFE_WDS_KEY.match(key):
        return key
    return "k" + hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


def webdataset_sidecar(row: dict) -> dict:
    """The .json member: everything but the image and the key that training may want."""
    return {name: value for name, value in row.items() if name != "image"}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def webdataset_bytes(table: pa.Table) -> bytes:
    """The tar twin of a shard: {key}.jpg, {key}.txt (alt-text), {key}.json, in shard order, fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for row in table.to_pylist():
            stem = webdataset_key(row["key"])
            _add_member(tar, f"{stem}.{image_extension(row['image'])}", row["image"])
            _add_member(tar, f"{stem}.txt", row["caption"].encode())
            _add_member(tar, f"{stem}.json",
                        json.dumps(webdataset_sidecar(row), ensure_ascii=False, sort_keys=True).encode())
    return buffer.getvalue()


def parquet_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def tar_name(index: int) -> str:
    """open_clip's brace pattern `{00000..00099}.tar` expands to these names."""
    return f"{index:05d}.tar"


def shard_done(output: Path, index: int, config: ExportConfig) -> bool:
    """A shard is done when its Parquet file (the commit point, written last) and, if asked, its tar exist."""
    if not (output / parquet_name(index)).is_file():
        return False
    return not config.webdataset or (output / WEBDATASET_DIR / tar_name(index)).is_file()


def write_shard(output: str | Path, index: int, parts: Iterable[pa.Table], config: ExportConfig) -> dict:
    """Write shard `index` atomically: the tar first, the Parquet file last as the commit point."""
    output = Path(output)
    table = order_shard(parts, config)
    written = {"index": index, "rows": table.num_rows}
    if config.webdataset:
        (output / WEBDATASET_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output / WEBDATASET_DIR / tar_name(index), webdataset_bytes(table))
    atomic_write_bytes(output / parquet_name(index), parquet_bytes(table, config.row_group_bytes))
    return written


def file_info(path: Path, rows: int) -> ShardInfo:
    return ShardInfo(path.name, rows, path.stat().st_size, file_sha256(path))


def verify_export(directory: str | Path, checksums: bool = True) -> dict:
    """Refuse an export whose Parquet shards or tar twins do not match the manifest's sizes and sha256s
    (sizes only, unless `checksums`: a stat per file, as `verify_manifest`)."""
    directory = Path(directory)
    manifest = verify_manifest(directory, checksums=checksums)
    twin = manifest.get("webdataset")
    for shard in (twin or {}).get("shards", []):
        path = directory / twin["directory"] / shard["name"]
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        if path.stat().st_size != shard["bytes"] or (checksums and file_sha256(path) != shard["sha256"]):
            raise ManifestError(f"{path} does not match its manifest checksum")
    return manifest


def usable_text(text: object, min_words: int = 1) -> bool:
    """A text a trainer may draw: at least `min_words`, counted as the rewrite stage validated it (two
    characters of an unspaced script make a word), so no rewrite it kept is dropped here."""
    return isinstance(text, str) and bool(text.strip()) and word_count(text) >= min_words


def is_rewrite(caption: str, text: object) -> bool:
    """A slot LaCLIP trains on as a rewrite: two words or more, and not the caption again (the copy the
    rewrite stage writes where it fell back). A slot that is not is the caption, as LaCLIP's own draw has it."""
    return usable_text(text, min_words=2) and text.strip() != caption.strip()


def valid_rewrites(caption: str, rewrites: list | None) -> list[str]:
    """The distinct rewrites of a row, for the data card that describes them. Whitespace around one does not
    make it another rewrite."""
    return list(dict.fromkeys(t.strip() for t in rewrites or () if is_rewrite(caption, t)))


def validate_training_table(table: pa.Table | pa.RecordBatch | pa.Schema, *, file: str | None = None) -> None:
    """What a trainer checks on an exported shard (or its schema): training columns, types, schema version."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    version = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if version is None or version.decode().split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaError(f"schema version {version!r} is not compatible with {SCHEMA_VERSION}", file=file)
    for name in TRAINING_COLUMNS:
        if name not in schema.names:
            raise SchemaError("missing training column", file=file, column=name)
        expected = PAIR_SCHEMA.field(name).type
        if not schema.field(name).type.equals(expected):
            raise SchemaError(f"column has type {schema.field(name).type}, expected {expected}",
                              file=file, column=name)
