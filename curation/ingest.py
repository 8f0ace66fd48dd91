"""Normalising raw rows into canonical pairs: the logic of the ingest stage.

The input may come from img2dataset, from a user's Parquet files or from the
demo generator; `IngestConfig` names its columns. Every row becomes either a
pair or a reject with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from curation.records import MAX_CAPTION_CHARS, Rejected, make_pair
from curation.rejects import reject, rejects_table
from curation.schema import CORE_FIELDS, PAIR_FIELDS, conform

STAGE = "ingest"


@dataclass(frozen=True)
class IngestConfig:
    key_column: str = "key"
    url_column: str = "url"
    caption_column: str = "caption"
    image_column: str = "image"
    max_caption_chars: int = MAX_CAPTION_CHARS

    def __post_init__(self) -> None:
        if self.max_caption_chars <= 0:
            raise ValueError(f"max_caption_chars must be positive, got {self.max_caption_chars}")

    def check_columns(self, names: list[str], file: str) -> None:
        missing = [c for c in (self.caption_column, self.image_column) if c not in names]
        if missing:
            raise ValueError(f"{file}: missing column(s) {missing}; found {names}. "
                             f"Name them with --caption_column / --image_column.")


def normalise_batch(batch: pa.RecordBatch, config: IngestConfig, *, source: str, file: str,
                    row_offset: int) -> tuple[pa.Table, pa.Table]:
    """Pairs and rejects for one batch of raw rows; extra input columns ride along unchanged."""
    config.check_columns(batch.schema.names, file)
    own = {config.key_column, config.url_column, config.caption_column, config.image_column}
    extras = [f for f in batch.schema if f.name not in own and f.name not in PAIR_FIELDS]
    pairs, rejected = [], []
    for i, row in enumerate(batch.to_pylist()):
        row_number = row_offset + i
        key = row.get(config.key_column) or f"{source}-{row_number:09d}"
        pair = make_pair(str(key), row.get(config.image_column), row.get(config.caption_column), source=source,
                         url=row.get(config.url_column), max_caption_chars=config.max_caption_chars)
        if isinstance(pair, Rejected):
            rejected.append(reject(str(key), STAGE, pair.reason, pair.detail, file, row_number))
            continue
        pair.update({f.name: row[f.name] for f in extras})
        pairs.append(pair)
    schema = pa.schema(list(CORE_FIELDS) + extras)
    return conform(pa.Table.from_pylist(pairs, schema=schema)), rejects_table(rejected)

