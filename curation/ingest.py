"""Normalising raw rows into canonical pairs: the logic of the ingest stage.

The input may come from img2dataset (a URL list we downloaded, or a folder
the user downloaded), from a user's Parquet files, from a folder of images or
from the demo generator; `IngestConfig` names its columns. Every row becomes
either a pair or a reject with a reason: a failed download keeps
img2dataset's status and error message, a row screened out before download
keeps the screening verdict, and each quality filter says which one it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curation.dedup import DedupConfig
from curation.input_check import is_bytes, is_text
from curation.records import MAX_CAPTION_CHARS, Rejected, make_pair
from curation.rejects import Reason, reject, rejects_table
from curation.schema import CORE_FIELDS, PAIR_FIELDS, SchemaError, conform

STAGE = "ingest"

# Columns that steer normalisation and are never carried into the pairs.
SCREEN_REASON, SCREEN_DETAIL = "_reject_reason", "_reject_detail"  # verdict of URL screening, before download
# Where the row came from, for rejects: the file and its 1-based line or row (curation.rejects says why).
ORIGIN_FILE, ORIGIN_LINE = "_origin_file", "_origin_line"
# Each pair's 0-based row in its input shard: what orders two copies of one row, whatever order the batches
# arrived in. The ingest job drops it, and the pair's origin (ORIGIN_FILE, ORIGIN_LINE: what a duplicate's
# reject names), before writing.
INPUT_ROW = "_input_row"
INTERNAL_COLUMNS = (INPUT_ROW, ORIGIN_FILE, ORIGIN_LINE)
STATUS, ERROR = "status", "error_message"  # img2dataset's verdict on the download
# What staging (of a URL list or an image folder) and the download write beside the pairs. Only rows that
# came through them carry these: in a user's own shards a `status` column is data, carried like any other.
STAGED_COLUMNS = frozenset({SCREEN_REASON, SCREEN_DETAIL, ORIGIN_FILE, ORIGIN_LINE, STATUS, ERROR, "_row"})
# An img2dataset folder's Parquet also repeats the caption as `txt`; a URL list's own `txt` column is data.
IMG2DATASET_COLUMNS = STAGED_COLUMNS | {"txt"}


@dataclass(frozen=True)
class QualityFilters:
    """Optional filters, all off by default (MetaCLIP and LaCLIP filter nothing at this point)."""

    min_caption_chars: int = 0
    max_caption_chars: int = 0  # 0: no bound (captions above IngestConfig.max_caption_chars are rejects anyway)
    min_side: int = 0
    max_aspect_ratio: float = 0.0  # long side / short side; 0: no bound

    def __post_init__(self) -> None:
        for name in ("min_caption_chars", "max_caption_chars", "min_side"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_aspect_ratio and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be 0 (off) or >= 1, got {self.max_aspect_ratio}")

    def failed(self, pair: dict) -> tuple[str, str] | None:
        """(filter name, detail) of the first filter the pair fails, or None."""
        chars, width, height = len(pair["caption"]), pair["width"], pair["height"]
        if self.min_caption_chars and chars < self.min_caption_chars:
            return "min_caption_chars", f"{chars} < {self.min_caption_chars}"
        if self.max_caption_chars and chars > self.max_caption_chars:
            return "max_caption_chars", f"{chars} > {self.max_caption_chars}"
        if self.min_side and min(width, height) < self.min_side:
            return "min_side", f"{width}x{height}: {min(width, height)} < {self.min_side}"
        if self.max_aspect_ratio and max(width, height) / min(width, height) > self.max_aspect_ratio:
            return "max_aspect_ratio", f"{width}x{height} > {self.max_aspect_ratio}"
        return None


@dataclass(frozen=True)
class IngestConfig:
    key_column: str = "key"
    url_column: str = "url"
    caption_column: str = "caption"
    image_column: str = "image"
    max_caption_chars: int = MAX_CAPTION_CHARS
    filters: QualityFilters = field(default_factory=QualityFilters)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self) -> None:
        if self.max_caption_chars <= 0:
            raise ValueError(f"max_caption_chars must be positive, got {self.max_caption_chars}")

    def check_columns(self, schema: pa.Schema, file: str) -> None:
        """The caption and image columns exist, and they and the URL column hold text and bytes."""
        names = schema.names
        missing = [c for c in (self.caption_column, self.image_column) if c not in names]
        if missing:
            raise ValueError(f"{file}: missing column(s) {missing}; found {names}. "
                             f"Name them with --caption_column / --image_column.")
        for column, allowed, what in ((self.caption_column, (is_text, is_bytes), "text"),
                                      (self.url_column, (is_text,), "text"), (self.image_column, (is_bytes,), "bytes")):
            if column in names:
                kind = schema.field(column).type
                if pa.types.is_dictionary(kind):  # pandas' categorical columns
                    kind = kind.value_type
                if not pa.types.is_null(kind) and not any(check(kind) for check in allowed):
                    raise SchemaError(f"column holds {kind}, not {what}", file=file, column=column)


def _early_reject(row: dict, control: frozenset[str]) -> tuple[str, str] | None:
    """The verdict already reached for this row (screened out, or img2dataset failed), if any."""
    if not control:
        return None
    if row.get(SCREEN_REASON):
        return row[SCREEN_REASON], row.get(SCREEN_DETAIL) or ""
    status = row.get(STATUS)
    if status is not None and status != "success":
        error = row.get(ERROR) or ""
        if "CV_IO_MAX_IMAGE_PIXELS" in error:  # OpenCV's limit (download.run_img2dataset sets it): its header
            error = "image area too large (refused from its header, before decoding)"
        return Reason.DOWNLOAD_FAILED, f"{status}: {error}"
    return None


def normalise_batch(batch: pa.RecordBatch, config: IngestConfig, *, source: str, file: str,
                    row_offset: int, control: frozenset[str] = STAGED_COLUMNS) -> tuple[pa.Table, pa.Table]:
    """Pairs and rejects for one batch of raw rows; extra input columns ride along unchanged.

    `source` names the pairs' origin where the rows have no `source` text of their own. `row_offset`: the
    batch's first row in `file`, 0-based as Parquet readers count; a reject names its row 1-based, or the
    list line staging recorded. `control`: the columns staging and img2dataset wrote (their verdicts are
    honoured, and they are not carried); empty for a user's own shards."""
    config.check_columns(batch.schema, file)
    extras = extra_fields(batch.schema, config, control)
    pairs, rejected = [], []
    for i, row in enumerate(batch.to_pylist()):
        place = row_offset + i + 1
        row_number = row.get(ORIGIN_LINE, place) if control else place
        where = (row.get(ORIGIN_FILE) if control else None) or file
        given = row.get(config.key_column)
        # A made key names its shard: row r of every shard of a keyless input made the same key, so all
        # but the first shard's were renamed, and an identical row at the same index dropped as a repeat.
        # The row stays 0-based, as it always was.
        key = str(given) if given not in (None, "") else f"{source}-{Path(file).stem}-{row_offset + i:09d}"
        verdict = _early_reject(row, control)
        if verdict is not None:
            rejected.append(reject(key, STAGE, verdict[0], verdict[1], where, row_number))
            continue
        own_source = row.get("source")
        pair = make_pair(key, row.get(config.image_column), row.get(config.caption_column),
                         source=own_source if isinstance(own_source, str) and own_source else source,
                         url=row.get(config.url_column), max_caption_chars=config.max_caption_chars)
        if isinstance(pair, Rejected):
            rejected.append(reject(key, STAGE, pair.reason, pair.detail, where, row_number))
            continue
        failed = config.filters.failed(pair)
        if failed is not None:
            rejected.append(reject(key, STAGE, Reason.FILTERED, f"{failed[0]}: {failed[1]}", where, row_number))
            continue
        pair.update({f.name: row[f.name] for f in extras})
        pair[INPUT_ROW] = row_offset + i  # unique in the shard: a list line is per list file
        pair[ORIGIN_FILE], pair[ORIGIN_LINE] = where, row_number
        pairs.append(pair)
    schema = pa.schema([*CORE_FIELDS, *extras, pa.field(INPUT_ROW, pa.int64()), pa.field(ORIGIN_FILE, pa.string()),
                        pa.field(ORIGIN_LINE, pa.int64())])
    return conform(pa.Table.from_pylist(pairs, schema=schema)), rejects_table(rejected)


def extra_fields(schema: pa.Schema, config: IngestConfig, control: frozenset[str]) -> list[pa.Field]:
    """The input columns that ride along: neither one a flag names, nor a pair column, nor staging's."""
    own = {config.key_column, config.url_column, config.caption_column, config.image_column}
    return [f for f in schema if f.name not in own and f.name not in PAIR_FIELDS and f.name not in control]


def extras_schema(schemas: list[tuple[str, pa.Schema, int]], config: IngestConfig, control: frozenset[str],
                  always: tuple[pa.Field, ...] = ()) -> pa.Schema:
    """One nullable type for each extra column over the whole input (file, schema, rows), plus `always`.

    Each output shard had the extras of its own input shard: a JSONL field only some rows have, or an extra
    all null in one shard (type null), gave shards of other columns, and pyarrow.dataset, reading by the
    first file's schema, dropped such columns without a word. Types Arrow can widen are widened; others
    are refused, naming the column and two files (a shard without rows only adds columns)."""
    found: dict[str, tuple[pa.Field, str]] = {field.name: (field, "") for field in always}
    for file, schema, rows in sorted(schemas, key=lambda item: not item[2]):  # shards with rows decide types
        for field in extra_fields(schema, config, control):
            field = field.with_nullable(True)  # a shard without the column gets nulls there
            if field.name not in found:
                found[field.name] = (field, file)
                continue
            known, where = found[field.name]
            try:
                widened = pa.unify_schemas([pa.schema([known]), pa.schema([field])], promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
                if not rows:
                    continue
                raise SchemaError(f"extra column holds {known.type} in {where or 'this stage'} and {field.type} "
                                  f"here; cast it to one type in every shard", file=file, column=field.name) from exc
            kept = widened.field(0)
            found[field.name] = (kept, where if kept.type.equals(known.type) else file)
    return pa.schema([field for field, _ in found.values()])


def with_extras(table: pa.Table, extras: pa.Schema) -> pa.Table:
    """The table with every extra column of the input, in one order and type (missing ones as nulls)."""
    for field in extras:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        elif not table.schema.field(field.name).type.equals(field.type):
            index = table.column_names.index(field.name)
            table = table.set_column(index, field, table.column(index).cast(field.type))
    return table.select([c for c in table.column_names if c not in extras.names] + extras.names)


def filter_counts(rejects: pa.Table) -> dict[str, int]:
    """Rows removed by each quality filter, from the rejects' details."""
    counts: dict[str, int] = {}
    for reason, detail in zip(rejects.column("reason").to_pylist(), rejects.column("detail").to_pylist()):
        if reason == Reason.FILTERED:
            name = (detail or "").split(":", 1)[0]
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def duplicate_counts(rejects: pa.Table) -> dict[str, int]:
    """Duplicates removed per criterion (sha256, url, phash), from the rejects' details."""
    counts: dict[str, int] = {}
    for reason, detail in zip(rejects.column("reason").to_pylist(), rejects.column("detail").to_pylist()):
        if reason in (Reason.DUPLICATE, Reason.NEAR_DUPLICATE):
            criterion = (detail or "").rsplit("by=", 1)[-1]
            counts[criterion] = counts.get(criterion, 0) + 1
    return dict(sorted(counts.items()))
