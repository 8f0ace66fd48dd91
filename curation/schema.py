"""The one Arrow schema for an image-text pair: the contract between every stage.

Each stage reads shards written by the stage before and adds columns; none
removes or retypes a column. Extra input columns (from a URL list, say) are
allowed and carried along untouched. Validation names the file, the column and
the row, because a data team debugging a 400M-row build needs to find the bad
row, not just learn that one exists.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = "1.0"
SCHEMA_VERSION_KEY = b"clip_curation.schema_version"

CORE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string(), nullable=True),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
)

# Filled by later stages; null until the stage that owns them has run.
STAGE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("matched_entries", pa.list_(pa.int32()), nullable=True),
    pa.field("keep_prob", pa.float32(), nullable=True),
    pa.field("rewrites", pa.list_(pa.string()), nullable=True),
    pa.field("synthetic_caption", pa.string(), nullable=True),
    pa.field("fused_caption", pa.string(), nullable=True),
)

PAIR_SCHEMA = pa.schema(CORE_FIELDS + STAGE_FIELDS, metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()})
PAIR_FIELDS = {f.name: f for f in PAIR_SCHEMA}


class SchemaError(ValueError):
    """A shard that breaks the pair contract; says where, so the row can be found.

    `row` is counted from 1, as a rejects table's `row` is (curation.rejects), so the first row of a
    shard is "row 1" in a refusal and in a reject alike."""

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None, row: int | None = None):
        self.file, self.column, self.row = file, column, row
        where = ", ".join(
            part for part in (
                f"file {file}" if file else "",
                f"column '{column}'" if column else "",
                f"row {row}" if row is not None else "",
            ) if part
        )
        super().__init__(f"{message} ({where})" if where else message)


@dataclass
class KeyTracker:
    """Finds keys seen twice, across shards too, in 8 bytes a row (about 30 while `check` sorts).

    Each key is kept as a 64-bit hash (its file and row follow from the order it
    was added in), not as a string in a dict (about 180 bytes a row with the key:
    70 GB for a 400M-row build). The
    duplicates are found once every key is in (`check`), by sorting the hashes;
    a hash shared by two keys that differ is told apart by reading both back
    (from the file, or from the keys themselves where a table has no file).
    """

    hashes: list[np.ndarray]
    places: list[tuple[str | None, list[str] | None, int]]  # (file, keys if held, first row) of each add

    @classmethod
    def new(cls) -> "KeyTracker":
        return cls(hashes=[], places=[])

    def add(self, keys: list[str], file: str | None, row_offset: int = 0, hold: bool = False) -> None:
        """Record a table's keys; `hold` keeps them too (a table not read from `file`)."""
        self.hashes.append(np.fromiter(
            (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys),
            dtype=np.uint64, count=len(keys)))
        self.places.append((file, list(keys) if hold or file is None else None, row_offset))

    def check(self) -> None:
        """Raise SchemaError at the later place of the first key seen twice, naming where it was first."""
        if not self.hashes:
            return
        hashes = np.concatenate(self.hashes)
        starts = np.cumsum([0] + [len(h) for h in self.hashes])
        order = np.argsort(hashes, kind="stable")  # equal hashes stay in the order they were added
        ordered = hashes[order]
        del hashes
        clashes, read = [], {}  # read: each file's key column, read once however many of its keys clash
        for begin in np.flatnonzero((ordered[1:] == ordered[:-1]) & np.r_[True, ordered[1:-1] != ordered[:-2]]):
            end = begin + 1
            while end < len(ordered) and ordered[end] == ordered[begin]:
                end += 1
            firsts: dict[str, int] = {}  # a run of one hash: the same key, or keys that only share a hash
            for index in order[begin:end].tolist():
                key = self._key(index, starts, read)
                if key in firsts:
                    clashes.append((index, firsts[key]))
                firsts.setdefault(key, index)
        if clashes:
            later, first = min(clashes)
            (first_file, first_row), (file, row) = self._where(first, starts), self._where(later, starts)
            raise SchemaError(f"duplicate key {self._key(later, starts, read)!r}, first seen in "
                              f"{first_file or 'this table'} row {first_row + 1}", file=file, column="key",
                              row=row + 1)

    def _place(self, index: int, starts: np.ndarray) -> tuple[str | None, list[str] | None, int, int]:
        """(file, keys if held, position in that add, row in the file) of the index-th key added."""
        add = int(np.searchsorted(starts, index, side="right")) - 1
        file, keys, offset = self.places[add]
        position = index - int(starts[add])
        return file, keys, position, offset + position

    def _where(self, index: int, starts: np.ndarray) -> tuple[str | None, int]:
        """(file, 0-based row in that file) of the index-th key added."""
        file, _, _, row = self._place(index, starts)
        return file, row

    def _key(self, index: int, starts: np.ndarray, read: dict[str, list[str]]) -> str:
        file, keys, position, row = self._place(index, starts)
        if keys is not None:
            return keys[position]
        if file not in read:
            read[file] = pq.read_table(file, columns=["key"]).column("key").to_pylist()
        return read[file][row]


def conform(table: pa.Table) -> pa.Table:
    """Add any missing stage column as nulls and order columns as the schema does.

    Core columns are never invented: their absence is an error for `validate`.
    Extra columns stay at the end, untouched.
    """
    n = table.num_rows
    for field in STAGE_FIELDS:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(n, type=field.type))
    ordered = [f.name for f in PAIR_SCHEMA if f.name in table.column_names]
    extra = [c for c in table.column_names if c not in PAIR_FIELDS]
    table = table.select(ordered + extra)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()})


def validate(table: pa.Table, *, file: str | None = None, keys: KeyTracker | None = None, row_offset: int = 0) -> None:
    """Raise SchemaError for a missing or mistyped column, a null where none is allowed, or a duplicate key.

    `row_offset` is the 0-based place of the table's first row in `file`; the error's row is 1-based."""
    version = (table.schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if version is not None and version.decode().split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaError(f"schema version {version.decode()} is not compatible with {SCHEMA_VERSION}", file=file)
    for field in PAIR_SCHEMA:
        if field.name not in table.column_names:
            if field in CORE_FIELDS:
                raise SchemaError("missing required column", file=file, column=field.name)
            continue
        actual = table.schema.field(field.name).type
        if not actual.equals(field.type):
            raise SchemaError(f"column has type {actual}, expected {field.type}", file=file, column=field.name)
        if not field.nullable:
            column = table.column(field.name)
            if column.null_count:
                row = pc.index(pc.is_null(column), True).as_py()
                raise SchemaError("null in a non-nullable column", file=file, column=field.name,
                                  row=row_offset + row + 1)
    if keys is not None:  # keys across tables: checked by the caller once all are in
        keys.add(table.column("key").to_pylist(), file, row_offset)
        return
    alone = KeyTracker.new()
    alone.add(table.column("key").to_pylist(), file, row_offset, hold=True)
    alone.check()


def empty_table(schema: pa.Schema = PAIR_SCHEMA) -> pa.Table:
    return schema.empty_table()
