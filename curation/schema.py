"""The one Arrow schema for an image-text pair: the contract between every stage.

Each stage reads shards written by the stage before and adds columns; none
removes or retypes a column. Extra input columns (from a URL list, say) are
allowed and carried along untouched. Validation names the file, the column and
the row, because a data team debugging a 400M-row build needs to find the bad
row, not just learn that one exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

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
    """A shard that breaks the pair contract; says where, so the row can be found."""

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
    """Remembers keys seen so far, so duplicates across shards are caught too."""

    seen: dict[str, tuple[str | None, int]]

    @classmethod
    def new(cls) -> "KeyTracker":
        return cls(seen={})

    def add(self, keys: list[str], file: str | None, row_offset: int = 0) -> None:
        for i, key in enumerate(keys):
            row = row_offset + i
            if key in self.seen:
                first_file, first_row = self.seen[key]
                raise SchemaError(
                    f"duplicate key {key!r}, first seen in {first_file or 'this table'} row {first_row}",
                    file=file, column="key", row=row,
                )
            self.seen[key] = (file, row)


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
    """Raise SchemaError for a missing or mistyped column, a null where none is allowed, or a duplicate key."""
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
                raise SchemaError("null in a non-nullable column", file=file, column=field.name, row=row_offset + row)
    tracker = keys if keys is not None else KeyTracker.new()
    tracker.add(table.column("key").to_pylist(), file, row_offset)


def empty_table(schema: pa.Schema = PAIR_SCHEMA) -> pa.Table:
    return schema.empty_table()
