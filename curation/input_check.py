"""The columns and keys a stage checks in every input shard before any work.

Each stage joins its results back to its rows by key, so two rows of one key
were silently cross-wired (the rewrite stage gave one row the other's
rewrites, the caption stage one VeC to both), and a key that is null, or a
shard that is not Parquet at all, crashed a Beam worker naming no file after
the model had loaded. A column of another type than the stage reads (an
int64 caption) ran through and left the wrong type in its output. Only the
footers and the key column are read: the image bytes wait for the stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.schema import KeyTracker, SchemaError
from curation.shards import open_parquet


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


@dataclass(frozen=True)
class InputCheck:
    """`columns`: what the stage reads besides `key`, each with the test its type must pass; `reads` says what
    the stage expects, for the message of a shard without them ("pair shards (run ingest first)")."""

    stage: str
    reads: str
    columns: dict[str, Callable[[pa.DataType], bool]] = field(default_factory=dict)
    not_null: tuple[str, ...] = ()  # columns every row must fill (read whole: text, not the image bytes)

    def __call__(self, paths: Iterable[Path]) -> None:
        """Raise, naming the file (and column and row), at the first shard the stage cannot read as it
        should; then at the first key seen twice, across shards too."""
        keys = KeyTracker.new()
        for path in paths:
            schema = open_parquet(path).schema_arrow
            wanted = {"key": is_text, **self.columns}
            missing = [name for name in wanted if name not in schema.names]
            if missing:
                raise SchemaError(f"missing column(s) {', '.join(missing)}; {self.stage} reads {self.reads}",
                                  file=str(path))
            for name, test in wanted.items():
                if not test(kind := schema.field(name).type):
                    raise SchemaError(f"column holds {kind}, which {self.stage} cannot read", file=str(path),
                                      column=name)
            for name in ("key", *self.not_null):  # each column read once, alone
                values = pq.read_table(path, columns=[name]).column(name)
                if values.null_count:
                    row = pc.index(pc.is_null(values), True).as_py()
                    raise SchemaError(f"no {name} ({values.null_count} null in all); {self.stage} needs one in "
                                      f"every row", file=str(path), column=name, row=row + 1)
                if name == "key":
                    keys.add(values.cast(pa.string()).to_pylist(), str(path))
        keys.check()
