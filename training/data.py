"""Streaming Parquet shards into training batches: checks first, then split, shuffle, curate, decode, tokenize.

- `inspect_shards` reads only Parquet footers and refuses, before any
  training, a dataset with a missing required column, a mistyped column or an
  incompatible schema version, naming the file and the column.
- The unit of work is one row group of one shard. Every epoch the units are
  put in an order drawn from (seed, epoch) and dealt to the
  `world_size x workers` readers, so no two readers share a row.
- Each reader runs its rows through: held-out filter (a hash of the key, the
  same for every seed, so every run is scored on the same rows), online
  curation (keep with keep_prob, drawn anew each epoch), a shuffle buffer, then
  image decoding, cropping, text choice and tokenization, all in the
  DataLoader worker. A corrupt image is skipped and counted.
- Resume: every sample carries its reader and its position in that reader's
  stream (before decoding), so `LoaderState` knows exactly what was consumed;
  a resumed reader fast-forwards without decoding, and the reader order is
  rotated so batches arrive in the same order as in an uninterrupted run.
"""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curation.schema import PAIR_FIELDS, SCHEMA_VERSION, SCHEMA_VERSION_KEY, SchemaError
from curation.shards import is_complete, read_manifest, shard_paths
from training.image_transforms import CorruptImage, decode, eval_transform, train_transform
from training.randomness import derive_seed, unit_uniform
from training.text_sampling import SOURCES, TextSampling, choose_text
from training.tokenizer import encode

REQUIRED_COLUMNS = ("key", "image", "caption")
OPTIONAL_COLUMNS = ("rewrites", "fused_caption", "synthetic_caption", "keep_prob", "matched_entries")
HOLDOUT_SALT = "retrieval-holdout"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' own threads fight the DataLoader's forks


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the smallest piece handed to a reader."""

    path: str
    row_group: int
    rows: int


@dataclass
class ShardSet:
    """What `inspect_shards` learned: the units to read and which optional columns exist."""

    units: list[Unit]
    columns: list[str]          # columns to read: required + present optional ones
    rows: int

    @property
    def shards(self) -> int:
        return len({u.path for u in self.units})


def _check_version(version: bytes | str | None, where: str) -> None:
    if version is None:
        return
    text = version.decode() if isinstance(version, bytes) else str(version)
    if text.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaError(f"schema version {text} is not compatible with the trainer's {SCHEMA_VERSION}", file=where)


def _has_values(parquet: pq.ParquetFile, column: str) -> bool:
    """Whether a column holds any non-null value, judged from the footer's statistics (no data read)."""
    metadata = parquet.metadata
    index = parquet.schema_arrow.get_field_index(column)
    leaves = [i for i in range(metadata.num_columns)
              if metadata.row_group(0).column(i).path_in_schema.split(".")[0] == column] if metadata.num_row_groups else []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for leaf in leaves or [index]:
            stats = group.column(leaf).statistics
            if stats is None or not stats.has_null_count or stats.null_count < group.num_rows:
                return True
    return False


def inspect_shards(source: str | Path, needed: list[str] = ()) -> ShardSet:
    """Check every shard's footer against the pair schema; `needed` optional columns must exist somewhere."""
    if is_complete(source):
        _check_version(read_manifest(source).get("schema_version"), str(Path(source) / "manifest.json"))
    paths = shard_paths(source)
    if not paths:
        raise FileNotFoundError(f"no Parquet shards in {source}")
    units, present = [], set()
    for path in paths:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:
            raise SchemaError(f"not a readable Parquet file: {exc}", file=str(path)) from exc
        schema = parquet.schema_arrow
        _check_version((schema.metadata or {}).get(SCHEMA_VERSION_KEY), str(path))
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise SchemaError(f"missing required column(s) {missing} for training; found {schema.names}",
                              file=str(path), column=missing[0])
        for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
            if name in schema.names:
                actual, expected = schema.field(name).type, PAIR_FIELDS[name].type
                if not actual.equals(expected) and not (pa.types.is_large_string(actual) and expected == pa.string()):
                    raise SchemaError(f"column has type {actual}, expected {expected}", file=str(path), column=name)
                if _has_values(parquet, name):
                    present.add(name)
        metadata = parquet.metadata
        units += [Unit(str(path), g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)
                  if metadata.row_group(g).num_rows]
    absent = [c for c in needed if c not in present]
    if absent:
        raise SchemaError(f"the requested text sampling or curation needs column(s) {absent}, which no shard in "
                          f"{source} has; run the stage that fills them or turn the option off", column=absent[0])
    columns = [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in present)]
    return ShardSet(units, columns, sum(u.rows for u in units))


def is_holdout(key: str, fraction: float) -> bool:
    return fraction > 0 and unit_uniform(HOLDOUT_SALT, key) < fraction


def iter_texts(shards: ShardSet, holdout_fraction: float) -> Iterator[str]:
    """Every training text (captions, rewrites, fused and synthetic captions) in shard order: BPE food."""
    text_columns = [c for c in ("caption", "rewrites", "fused_caption", "synthetic_caption") if c in shards.columns]
    for path in dict.fromkeys(u.path for u in shards.units):
        table = pq.read_table(path, columns=["key", *text_columns])
        for row in table.to_pylist():
            if is_holdout(row["key"], holdout_fraction):
                continue
            yield row["caption"]
            yield from (t for t in row.get("rewrites") or [] if t)
            for column in ("fused_caption", "synthetic_caption"):
                if row.get(column):
                    yield row[column]


@dataclass
class StreamSpec:
    """Everything a reader needs, picklable so it travels to DataLoader workers."""

    shards: ShardSet
    seed: int
    image_size: int
    context_length: int
    sampling: TextSampling = field(default_factory=TextSampling)
    holdout_fraction: float = 0.0
    crop_scale_min: float = 0.9
    online_curation: bool = False
    shuffle_buffer: int = 1000
    train: bool = True          # False: the held-out rows, in order, centre-cropped, alt-text only


class ShardStream(IterableDataset):
    """Samples for one epoch of one rank; see the module docstring for the order of operations."""

    def __init__(self, spec: StreamSpec, tokenizer, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 start: dict[int, int] | None = None, rotation: int = 0):
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.start = dict(start or {})
        self.rotation = rotation

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return (worker + self.rotation) % workers, workers

    def _units(self, reader: int, readers_per_rank: int) -> list[Unit]:
        units = list(self.spec.shards.units)
        if self.spec.train:
            units.sort(key=lambda u: derive_seed(self.spec.seed, self.epoch, "units", u.path, u.row_group))
        total = self.world_size * readers_per_rank
        return units[self.rank * readers_per_rank + reader::total]

    def _rows(self, units: list[Unit], counts: collections.Counter) -> Iterator[dict]:
        spec = self.spec
        for unit in units:
            table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=spec.shards.columns)
            for row in table.to_pylist():
                if is_holdout(row["key"], spec.holdout_fraction) == spec.train:
                    continue
                if spec.train and spec.online_curation and row.get("keep_prob") is not None:
                    if unit_uniform(spec.seed, row["key"], self.epoch, "keep") >= row["keep_prob"]:
                        counts["curated_out"] += 1
                        continue
                yield row

    def _shuffled(self, rows: Iterator[dict], reader: int) -> Iterator[dict]:
        if not self.spec.train or self.spec.shuffle_buffer <= 1:
            yield from rows
            return
        rng = random.Random(derive_seed(self.spec.seed, self.epoch, "shuffle", self.rank, reader))
        buffer: list[dict] = []
        for row in rows:
            buffer.append(row)
            if len(buffer) >= self.spec.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        reader, readers = self._reader()
        counts: collections.Counter = collections.Counter()
        skip = self.start.get(reader, 0)
        stream = self._shuffled(self._rows(self._units(reader, readers), counts), reader)
        for index, row in enumerate(stream):
            if index < skip:
                continue
            try:
                image = decode(row["image"])
            except CorruptImage:
                counts["corrupt_images"] += 1
                continue
            if spec.train:
                pixels = train_transform(image, spec.image_size, spec.crop_scale_min, spec.seed, row["key"], self.epoch)
                text, source = choose_text(row, spec.sampling, spec.seed, self.epoch)
            else:
                pixels, text, source = eval_transform(image, spec.image_size), row["caption"], "caption"
            yield {"pixel_values": pixels, "text": text, "source": source, "key": row["key"], "reader": reader,
                   "index": index, "counts": dict(counts)}
            counts.clear()

    def collate(self, samples: list[dict]) -> dict:
        """Stack images and tokenize texts, in the worker; carry the bookkeeping the main process needs."""
        tokens, truncated = encode(self.tokenizer, [s["text"] for s in samples], self.spec.context_length)
        counts: collections.Counter = collections.Counter(truncated_texts=truncated)
        for s in samples:
            counts.update(s["counts"])
        counts.update(f"text_{s['source']}" for s in samples)
        return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]), **tokens,
                "keys": [s["key"] for s in samples], "texts": [s["text"] for s in samples],
                "reader": samples[0]["reader"], "stream_end": max(s["index"] for s in samples) + 1,
                "counts": dict(counts)}


@dataclass
class LoaderState:
    """Where a rank's data stream stands: epoch, what each reader has delivered, whose batch comes next."""

    epoch: int = 0
    consumed: dict[int, int] = field(default_factory=dict)
    next_reader: int = 0
    batches: int = 0            # batches consumed in this epoch
    counts: dict[str, int] = field(default_factory=dict)

    def update(self, batch: dict, readers: int) -> None:
        self.consumed[batch["reader"]] = batch["stream_end"]
        self.next_reader = (batch["reader"] + 1) % readers
        self.batches += 1
        for k, v in batch["counts"].items():
            self.counts[k] = self.counts.get(k, 0) + v

    def next_epoch(self) -> None:
        self.epoch += 1
        self.consumed, self.next_reader, self.batches = {}, 0, 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": {str(k): v for k, v in self.consumed.items()},
                "next_reader": self.next_reader, "batches": self.batches, "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, data: dict) -> "LoaderState":
        return cls(data["epoch"], {int(k): v for k, v in data["consumed"].items()}, data["next_reader"],
                   data["batches"], dict(data.get("counts", {})))


def readers_for(shards: ShardSet, workers: int, world_size: int) -> int:
    """Readers per rank: the requested workers, fewer if there are not enough units to feed them all."""
    per_rank = len(shards.units) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(shards.units)} row groups cannot feed {world_size} ranks; "
                         f"write smaller row groups or use fewer ranks")
    return max(1, min(max(workers, 1), per_rank))


def epoch_loader(spec: StreamSpec, tokenizer, state: LoaderState, *, workers: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """The DataLoader for the rest of `state.epoch`: readers fast-forward past what was consumed."""
    dataset = ShardStream(spec, tokenizer, rank=rank, world_size=world_size, epoch=state.epoch,
                          start=state.consumed, rotation=state.next_reader)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=dataset.collate,
                      drop_last=spec.train, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def train_batches(spec: StreamSpec, tokenizer, state: LoaderState, *, workers: int, batch_size: int,
                  rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> Iterator[dict]:
    """Endless batches, epoch after epoch, updating `state` as each batch is handed out."""
    readers = readers_for(spec.shards, workers, world_size)
    while True:
        delivered = 0
        loader = epoch_loader(spec, tokenizer, state, workers=readers if workers else 0, batch_size=batch_size,
                              rank=rank, world_size=world_size, pin_memory=pin_memory)
        for batch in loader:
            state.update(batch, readers if workers else 1)
            delivered += 1
            yield batch
        if delivered == 0 and state.batches == 0:
            raise ValueError(f"epoch {state.epoch} gave no full batch of {batch_size} on rank {rank}: "
                             f"too few training rows ({spec.shards.rows} in {spec.shards.shards} shards, before "
                             f"holdout and curation); lower --batch_size")
        state.next_epoch()


def counts_summary(counts: dict[str, int]) -> dict[str, int]:
    """Text sources and skip counters in a fixed order, zeros included, for logs and metrics."""
    keys = [f"text_{s}" for s in SOURCES] + ["corrupt_images", "curated_out", "truncated_texts"]
    return {k: int(counts.get(k, 0)) for k in keys}
