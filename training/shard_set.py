"""What the trainer knows about its input before reading a row: the shards' footers, checked, as units of work.

- `inspect_shards` reads only Parquet footers and refuses, before any
  training, a dataset with a missing required column, a mistyped column or an
  incompatible (or absent) schema version, naming the file and the column. The
  version rule is the export contract's (`curation.export.validate_training_table`),
  so a shard the export's check refuses, the trainer refuses too.
- The trainer accepts any pair-schema subset with key, image and caption:
  optional columns may exist in some shards and not in others. Each file's
  own columns are recorded and `read_unit` fills the missing ones with nulls,
  so a mixed dataset never fails mid-epoch.
- `has_values` is the one answer to "does this column hold anything", from
  the footers' null counts (no data read); the CLI and the ablation use it too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.export import TRAINING_COLUMNS, validate_training_table
from curation.schema import PAIR_FIELDS, SCHEMA_VERSION_KEY, SchemaError
from curation.failed_checks import verify_input
from curation.shards import is_complete, open_parquet, read_manifest, refuse_unfinished, shard_paths
from training.randomness import unit_uniform

REQUIRED_COLUMNS = ("key", "image", "caption")
OPTIONAL_COLUMNS = ("rewrites", "fused_caption", "synthetic_caption", "keep_prob", "matched_entries")
TEXT_COLUMNS = ("caption", "rewrites", "fused_caption", "synthetic_caption")
HOLDOUT_SALT = "retrieval-holdout"
# Every training column, correctly typed: validate_training_table on it can only fail on the version.
_VERSION_PROBE = pa.schema([PAIR_FIELDS[name] for name in TRAINING_COLUMNS])


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the smallest piece handed to a reader. `name` (the shard's path inside
    the input) is what seeds its place in an epoch, so the order does not depend on how the input is spelled."""

    path: str
    name: str
    row_group: int
    rows: int


@dataclass
class ShardSet:
    """What `inspect_shards` learned: the units to read, which optional columns hold values, each file's columns."""

    units: list[Unit]
    columns: list[str]                      # required + optional columns with a value in some shard
    rows: int
    file_columns: dict[str, frozenset[str]]
    file_values: dict[str, frozenset[str]]  # the columns each file holds a value in

    @property
    def shards(self) -> int:
        return len(self.file_columns)


def check_schema_version(metadata: dict | None, where: str) -> None:
    """Refuse a missing or incompatible schema version with the export's own rule and message."""
    validate_training_table(_VERSION_PROBE.with_metadata(metadata or {}), file=where)


def column_has_values(parquet: pq.ParquetFile, column: str) -> bool:
    """Whether a column holds any non-null value, judged from the footer's statistics (no data read).

    A row group without statistics counts as having values: better to read a
    null column than to drop a filled one. The test is the count of non-null leaf values, not
    `null_count < num_rows`: a list column's null count also counts null elements, so
    `[["a rewrite", None, None], None]` has 3 nulls in 2 rows and one value.
    """
    if column not in parquet.schema_arrow.names:
        return False
    metadata = parquet.metadata
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for leaf in column_leaves(parquet, column):
            stats = group.column(leaf).statistics
            if stats is None or not stats.has_null_count or stats.num_values > 0:
                return True
    return False


def column_leaves(parquet: pq.ParquetFile, column: str) -> list[int]:
    """The footer's column chunks that hold `column` (one for a flat column, several for a nested one)."""
    metadata = parquet.metadata
    leaves = [i for i in range(metadata.num_columns)
              if metadata.row_group(0).column(i).path_in_schema.split(".")[0] == column] if metadata.num_row_groups else []
    return leaves or [parquet.schema_arrow.get_field_index(column)]


def null_count(parquet: pq.ParquetFile, column: str) -> int:
    """Nulls in a flat column, from the footer's statistics; a row group written without them (pyarrow's
    `write_statistics=False`) has that column read, so a null is found here and not mid-epoch in a worker."""
    (leaf,) = column_leaves(parquet, column)
    nulls = 0
    for g in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(g).column(leaf).statistics
        if stats is not None and stats.has_null_count:
            nulls += stats.null_count
        else:
            nulls += parquet.read_row_group(g, columns=[column]).column(column).null_count
    return nulls


def has_values(source: str | Path, column: str) -> bool:
    """True when some shard of `source` holds a non-null `column` (the caption stage may leave fused captions null)."""
    return any(column_has_values(pq.ParquetFile(path), column) for path in shard_paths(source))


def inspect_shards(source: str | Path, needed: Iterable[str] = ()) -> ShardSet:
    """Check every shard's footer against the pair schema; `needed` optional columns must hold values somewhere."""
    refuse_unfinished(source)
    if is_complete(source):
        # Each shard's size against the manifest, a stat per file: a copy cut short is refused before
        # training (the sha256s too with --verify_checksums, which reads all the data once).
        version = verify_input(source, checksums=False).get("schema_version")
        check_schema_version({SCHEMA_VERSION_KEY: str(version).encode()} if version else None,
                             str(Path(source) / "manifest.json"))
    paths = shard_paths(source)
    if not paths:
        raise FileNotFoundError(f"no Parquet shards in {source}")
    units, present, file_columns, file_values = [], set(), {}, {}
    for path in paths:
        filled: set[str] = set()
        parquet = open_parquet(path)
        schema = parquet.schema_arrow
        check_schema_version(schema.metadata, str(path))
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise SchemaError(f"missing required column(s) {missing} for training; found {schema.names}",
                              file=str(path), column=missing[0])
        for name in ("key", "caption"):  # a row trains on its caption and draws on its key
            if nulls := null_count(parquet, name):
                first = pc.index(pc.is_null(parquet.read(columns=[name]).column(name)), True).as_py()
                raise SchemaError(f"{nulls} row(s) have no {name}; every training row needs a key and a caption",
                                  file=str(path), column=name, row=first + 1)
        for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
            if name in schema.names:
                actual, expected = schema.field(name).type, PAIR_FIELDS[name].type
                if not actual.equals(expected) and not (pa.types.is_large_string(actual) and expected == pa.string()):
                    raise SchemaError(f"column has type {actual}, expected {expected}", file=str(path), column=name)
                if column_has_values(parquet, name):
                    filled.add(name)
        present |= filled
        file_columns[str(path)] = frozenset(c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in schema.names)
        file_values[str(path)] = frozenset(filled)
        metadata = parquet.metadata
        name = path.relative_to(source).as_posix() if Path(source).is_dir() else path.name
        units += [Unit(str(path), name, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)
                  if metadata.row_group(g).num_rows]
    absent = [c for c in needed if c not in present]
    if absent:
        raise SchemaError(f"the requested text sampling or curation needs column(s) {absent}, which no shard in "
                          f"{source} has; run the stage that fills them or turn the option off", column=absent[0])
    columns = [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in present)]
    return ShardSet(units, columns, sum(u.rows for u in units), file_columns, file_values)


def _with_nulls(table: pa.Table, columns: Iterable[str]) -> pa.Table:
    for name in columns:
        if name not in table.column_names:
            table = table.append_column(PAIR_FIELDS[name], pa.nulls(table.num_rows, PAIR_FIELDS[name].type))
    return table


def read_unit(shards: ShardSet, unit: Unit, columns: list[str], rows: list[int] | None = None) -> pa.Table:
    """`columns` of one row group (only `rows` of it if given); a column this file lacks comes back as nulls."""
    own = [c for c in columns if c in shards.file_columns[unit.path]]
    table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=own)
    if rows is not None:
        table = table.take(pa.array(rows, pa.int64()))
    return _with_nulls(table, columns)


def is_holdout(key: str, fraction: float) -> bool:
    return fraction > 0 and unit_uniform(HOLDOUT_SALT, key) < fraction


def iter_texts(shards: ShardSet, holdout_fraction: float, sampled: Iterable[str] = TEXT_COLUMNS) -> Iterator[str]:
    """Every training text in shard order, BPE food: the caption and the `sampled` text columns (those the
    run trains on: merges spent on texts it never sees are lost to the ones it does)."""
    wanted = [c for c in TEXT_COLUMNS if c in shards.columns and (c == "caption" or c in sampled)]
    for path, own in shards.file_columns.items():
        table = _with_nulls(pq.read_table(path, columns=["key", *(c for c in wanted if c in own)]), wanted)
        for row in table.to_pylist():
            if is_holdout(row["key"], holdout_fraction):
                continue
            yield row["caption"]
            yield from (t for t in row.get("rewrites") or [] if t)
            for column in ("fused_caption", "synthetic_caption"):
                if row.get(column):
                    yield row[column]


def input_fingerprint(source: str | Path) -> str:
    """What a run trains on, so that a resume can refuse other data under the same path.

    With a manifest (every stage writes one): the shards' names and sha256s as
    recorded there, so a re-export with other contents is caught without
    hashing terabytes. Without one: each file's name, size and modification time.
    """
    if is_complete(source):
        parts = [[s["name"], s["sha256"]] for s in read_manifest(source)["shards"]]
    else:
        parts = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in shard_paths(source)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
