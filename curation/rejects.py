"""Rejected rows and the reasons they carry.

A row that cannot go on is never dropped silently: it becomes a row of the
rejects table with a reason from a small fixed vocabulary (so reasons can be
counted and charted) and a free-text detail (so a person can debug it).

Where it came from is `source` (the file) and `row`, counted from 1 as an editor or `sed -n Np` counts:
the line in a CSV, TSV or JSONL file (a header row is a line too), the row in a Parquet file, an image's
place in its folder's sorted listing. One convention for every input and stage, so a reader never has to
guess whether there is a row 0.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import pyarrow as pa


class Reason:
    """The reject vocabulary. Stages add to it here, never ad hoc strings."""

    UNDECODABLE_IMAGE = "undecodable_image"
    EMPTY_IMAGE = "empty_image"
    IMAGE_TOO_LARGE = "image_too_large"
    EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"  # caption stage: VLM processors refuse such shapes
    EMPTY_CAPTION = "empty_caption"
    NON_UTF8_CAPTION = "non_utf8_caption"
    CAPTION_TOO_LONG = "caption_too_long"
    MISSING_FIELD = "missing_field"
    DUPLICATE = "duplicate"  # detail is "duplicate_of=<key>"
    NEAR_DUPLICATE = "near_duplicate"  # detail is "duplicate_of=<key> by=phash"
    DOWNLOAD_FAILED = "download_failed"
    BAD_URL = "bad_url"
    NO_MATCH = "no_metadata_match"
    FILTERED = "quality_filter"


REJECT_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=True),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=True),
    pa.field("source", pa.string(), nullable=True),
    # Described in the files too, for whoever opens a rejects table without this code at hand.
    pa.field("row", pa.int64(), nullable=True, metadata={
        "description": "1-based line of `source` (CSV/TSV/JSONL, a header row counts) or 1-based row (Parquet)"}),
])


def reject(key: str | None, stage: str, reason: str, detail: str = "", source: str | None = None, row: int | None = None) -> dict:
    """One reject; `row` is 1-based (see the module docstring), `source` the file it is counted in."""
    return {"key": key, "stage": stage, "reason": reason, "detail": detail[:2000], "source": source, "row": row}


def rejects_table(rows: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=REJECT_SCHEMA)


def count_reasons(table: pa.Table) -> dict[str, int]:
    return dict(sorted(collections.Counter(table.column("reason").to_pylist()).items()))
