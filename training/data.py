"""Streaming the checked shards into training batches: split, curate, shuffle, decode, tokenize, batch.

- The unit of work is one row group of one shard (`training.shard_set`).
  Every epoch the units are put in an order drawn from (seed, epoch), and that
  row sequence is cut into `world_size x readers` equal ranges, one per
  reader: no two readers share a row, and their row counts differ by at most
  one, so every row is seen as often (a row group on a cut is read by both
  readers, each taking its own rows). Holdout, curation and corrupt images
  then leave readers with somewhat different batch counts, so ranks may
  drift apart by an epoch's end; their streams are endless, so none waits.
- Each reader runs its rows through: held-out filter (a hash of the key, the
  same for every seed, so every run is scored on the same rows), online
  curation (`training.online_curation`, drawn anew each epoch), a shuffle
  buffer, then image decoding, cropping, text choice, tokenization and
  batching, all in its DataLoader worker. A corrupt image is skipped and counted.
- A reader is endless: epoch after epoch, each epoch closed by an end marker
  that carries the counts of its rows that no batch carried (the dropped last
  partial batch, curated-out or corrupt rows after the last sample). So one
  DataLoader serves the whole run (no worker start-up per epoch), and every
  counter covers every row exactly once.
- `train_batches` hands batches out in the DataLoader's own order: readers
  take turns, one item each (a batch, or an epoch's end marker), and each
  reader goes on into its next epoch on its own. No batch waits in the main
  process for another reader to catch up, however far their epochs drift apart
  over a long run.
- Resume: every batch carries its reader and its position in that reader's
  stream (before decoding), and `LoaderState` records, per reader, its epoch
  and what of it was consumed, and whose turn is next: the resumed
  DataLoader's first worker serves that reader. A resumed reader fast-forwards
  without decoding and drops the counts of what it skips (they were counted
  before the checkpoint), so batches and counters equal an uninterrupted run's;
  row groups whose rows it all skips are read without their images and texts.
"""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.image_transforms import CorruptImage, decode, eval_transform, train_transform
from training.online_curation import keep_probabilities_of
from training.randomness import derive_seed, unit_uniform
from training.shard_set import REQUIRED_COLUMNS, ShardSet, Unit, is_holdout, read_unit
from training.text_sampling import SOURCES, TextSampling, choose_text
from training.tokenizer import encode

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' own threads fight the DataLoader's forks
# Version of how an epoch orders its units, recorded in checkpoints: a loader state is a position in that
# order, so a resume under another one would repeat or skip rows. 2: seeded by the shard's name in the input;
# 3: dealt to readers as equal row ranges; 4: readers' turns run on across epoch ends.
DATA_ORDER = 4


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one unit: the part of it one reader reads in one epoch."""

    unit: Unit
    start: int
    stop: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.unit.rows


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
    entry_p: np.ndarray | None = None   # online curation at another t: per-entry probabilities (else keep_prob)
    max_rows: int = 0           # held-out stream only: stop after this many rows (0: all)

    @property
    def columns(self) -> list[str]:
        """The columns a reader reads: the required ones and those its text sampling or curation uses."""
        wanted = [*self.sampling.columns, *self.curation_columns] if self.train else []
        return [*REQUIRED_COLUMNS, *(c for c in wanted if c in self.shards.columns)]

    @property
    def curation_columns(self) -> list[str]:
        if not (self.train and self.online_curation):
            return []
        return ["matched_entries"] if self.entry_p is not None else ["keep_prob"]


class ShardStream(IterableDataset):
    """Batches (and epoch-end markers) of one rank; inside a DataLoader worker, of the reader that worker is."""

    def __init__(self, spec: StreamSpec, tokenizer, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 start: LoaderState | None = None):
        super().__init__()
        self.spec, self.tokenizer, self.batch_size = spec, tokenizer, batch_size
        self.rank, self.world_size = rank, world_size
        self.start = start or LoaderState()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, readers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader asks its workers in turn from worker 0, so worker 0 serves the reader whose turn is next.
        reader = (worker + self.start.next_reader) % readers
        if not self.spec.train:
            yield from self.epoch(reader, readers, 0)
            return
        epoch, skip = self.start.start_of(reader)
        while True:
            yield from self.epoch(reader, readers, epoch, skip)
            epoch, skip = epoch + 1, 0

    def _pieces(self, reader: int, readers: int, epoch: int) -> list[Piece]:
        """This reader's equal share of the epoch's row sequence, as the pieces of units it covers."""
        units = list(self.spec.shards.units)
        if self.spec.train:
            units.sort(key=lambda u: derive_seed(self.spec.seed, epoch, "units", u.name, u.row_group))
        total, index = self.world_size * readers, self.rank * readers + reader
        rows = sum(u.rows for u in units)
        lo, hi = rows * index // total, rows * (index + 1) // total
        pieces, offset = [], 0
        for unit in units:
            start, stop = max(lo, offset), min(hi, offset + unit.rows)
            if start < stop:
                pieces.append(Piece(unit, start - offset, stop - offset))
            offset += unit.rows
        return pieces

    def _rows(self, pieces: list[Piece], epoch: int, counts: collections.Counter, light: frozenset[int] = frozenset(),
              survivors: dict[int, int] | None = None) -> Iterator[dict]:
        """The rows that pass holdout and curation, each tagged with its piece's number (`_piece`).

        Pieces in `light` are read without images and texts: a resumed reader skips all their rows.
        `survivors` gets each fully read piece's count of passing rows.
        """
        spec = self.spec
        for number, piece in enumerate(pieces):
            unit, own = piece.unit, None if piece.whole else list(range(piece.start, piece.stop))
            if spec.train:
                columns = ["key", *spec.curation_columns] if number in light else spec.columns
                table = read_unit(spec.shards, unit, columns, own)
            else:  # keys first: only the held-out rows' images are read
                keys = read_unit(spec.shards, unit, ["key"]).column("key").to_pylist()
                held = [i for i in range(piece.start, piece.stop) if is_holdout(keys[i], spec.holdout_fraction)]
                if not held:
                    continue
                table = read_unit(spec.shards, unit, spec.columns, held)
            keep = keep_probabilities_of(table, spec.entry_p, unit.path) if spec.curation_columns else None
            passed = 0
            for i, row in enumerate(table.to_pylist()):
                if spec.train and is_holdout(row["key"], spec.holdout_fraction):
                    continue
                if keep is not None and unit_uniform(spec.seed, row["key"], epoch, "keep") >= keep[i]:
                    counts["curated_out"] += 1
                    continue
                passed += 1
                row["_piece"] = number
                yield row
            if survivors is not None:
                survivors[number] = passed

    def _skipped_pieces(self, pieces: list[Piece], reader: int, epoch: int, skip: int) -> frozenset[int]:
        """The pieces whose passing rows all come before stream position `skip`, found from keys alone.

        The shuffle's draws depend only on how many rows it holds, so the keys-only stream puts every row
        where the full one does: those pieces' images and texts need not be read to be skipped.
        """
        survivors: dict[int, int] = {}
        rows = self._rows(pieces, epoch, collections.Counter(), frozenset(range(len(pieces))), survivors)
        before: collections.Counter = collections.Counter()
        for index, row in enumerate(self._shuffled(rows, reader, epoch)):
            if index >= skip:
                break
            before[row["_piece"]] += 1
        return frozenset(number for number, passed in survivors.items() if before[number] == passed)

    def _shuffled(self, rows: Iterator[dict], reader: int, epoch: int) -> Iterator[dict]:
        if not self.spec.train or self.spec.shuffle_buffer <= 1:
            yield from rows
            return
        rng = random.Random(derive_seed(self.spec.seed, epoch, "shuffle", self.rank, reader))
        buffer: list[dict] = []
        for row in rows:
            buffer.append(row)
            if len(buffer) >= self.spec.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def epoch(self, reader: int, readers: int, epoch: int, skip: int = 0) -> Iterator[dict]:
        """One epoch of one reader from stream position `skip`: its batches, then (training) its end marker.

        `counts` holds events (curated-out rows, corrupt images) not yet carried
        by a sample; each sample takes them along, and a skipped position drops them.
        """
        spec = self.spec
        counts: collections.Counter = collections.Counter()
        pending: list[dict] = []
        taken = 0
        pieces = self._pieces(reader, readers, epoch)
        light = self._skipped_pieces(pieces, reader, epoch, skip) if skip and spec.train else frozenset()
        stream = self._shuffled(self._rows(pieces, epoch, counts, light), reader, epoch)
        for index, row in enumerate(stream):
            if index < skip:
                counts.clear()
                continue
            try:
                image = decode(row["image"])
            except CorruptImage:
                counts["corrupt_images"] += 1
                continue
            if spec.train:
                pixels = train_transform(image, spec.image_size, spec.crop_scale_min, spec.seed, row["key"], epoch)
                text, source = choose_text(row, spec.sampling, spec.seed, epoch)
            else:
                pixels, text, source = eval_transform(image, spec.image_size), row["caption"], "caption"
            pending.append({"pixel_values": pixels, "text": text, "source": source, "key": row["key"],
                            "index": index, "counts": dict(counts)})
            counts.clear()
            taken += 1
            if len(pending) == self.batch_size:
                yield self._batch(pending, reader, epoch)
                pending = []
            if spec.max_rows and taken >= spec.max_rows:
                break
        if not spec.train:
            if pending:
                yield self._batch(pending, reader, epoch)
            return
        for sample in pending:  # the dropped partial batch: its rows' events still happened
            counts.update(sample["counts"])
        counts["dropped_partial"] += len(pending)
        yield {"end": True, "reader": reader, "epoch": epoch, "counts": dict(counts)}

    def _batch(self, samples: list[dict], reader: int, epoch: int) -> dict:
        """Stack images and tokenize texts, in the worker; carry the bookkeeping the main process needs."""
        tokens, truncated = encode(self.tokenizer, [s["text"] for s in samples], self.spec.context_length)
        counts: collections.Counter = collections.Counter(truncated_texts=truncated)
        for s in samples:
            counts.update(s["counts"])
        counts.update(f"text_{s['source']}" for s in samples)
        return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]), **tokens,
                "keys": [s["key"] for s in samples], "texts": [s["text"] for s in samples],
                "reader": reader, "epoch": epoch, "stream_end": samples[-1]["index"] + 1,
                "counts": {k: v for k, v in counts.items() if v}}


@dataclass
class LoaderState:
    """Where a rank's data stream stands: each reader's epoch and position in it, whose turn is next, counters."""

    epochs: dict[int, int] = field(default_factory=dict)     # reader -> the epoch it is in
    consumed: dict[int, int] = field(default_factory=dict)   # reader -> stream position after its last batch
    batches: dict[int, int] = field(default_factory=dict)    # reader -> batches it gave in its current epoch
    next_reader: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        """Epochs every reader has finished."""
        return min(self.epochs.values(), default=0)

    def start_of(self, reader: int) -> tuple[int, int]:
        """(epoch, stream position) a reader restarts from."""
        return self.epochs.get(reader, 0), self.consumed.get(reader, 0)

    def update(self, item: dict, readers: int) -> None:
        """Account for a batch or an end marker handed out by `train_batches`."""
        reader = item["reader"]
        if item.get("end"):
            self.epochs[reader] = self.epochs.get(reader, 0) + 1
            self.consumed[reader] = self.batches[reader] = 0
        else:
            self.consumed[reader] = item["stream_end"]
            self.batches[reader] = self.batches.get(reader, 0) + 1
        self.next_reader = (reader + 1) % readers
        for k, v in item["counts"].items():
            self.counts[k] = self.counts.get(k, 0) + v

    def to_dict(self) -> dict:
        return {"epochs": {str(k): v for k, v in self.epochs.items()},
                "consumed": {str(k): v for k, v in self.consumed.items()},
                "batches": {str(k): v for k, v in self.batches.items()},
                "next_reader": self.next_reader, "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, data: dict) -> LoaderState:
        def per_reader(name: str) -> dict[int, int]:
            return {int(k): v for k, v in data[name].items()}
        return cls(per_reader("epochs"), per_reader("consumed"), per_reader("batches"), data["next_reader"],
                   dict(data["counts"]))


def readers_for(shards: ShardSet, workers: int, world_size: int, batch_size: int) -> int:
    """Readers per rank: the requested workers (one without workers), fewer where a worker's share of the
    rows would not fill a batch. Refused up front, on every rank alike, when a rank's share cannot.

    Each reader drops its partial last batch every epoch (counted as `dropped_partial`); the epoch's
    fresh order drops other rows next time, and more readers decode faster, so their number is not cut
    to drop fewer."""
    per_rank = shards.rows // world_size
    if per_rank < batch_size:
        raise ValueError(f"{shards.rows} rows in {shards.shards} shards give each of {world_size} rank(s) "
                         f"{per_rank}, fewer than a batch of {batch_size}; lower --batch_size or use fewer ranks")
    return max(1, min(workers, per_rank // batch_size))


def train_batches(spec: StreamSpec, tokenizer, state: LoaderState, *, workers: int, batch_size: int,
                  rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> Iterator[dict]:
    """Endless batches, epoch after epoch, from one DataLoader; `state` is updated as each batch is handed out.

    Close the generator to stop the workers.
    """
    readers = readers_for(spec.shards, workers, world_size, batch_size)
    stream = ShardStream(spec, tokenizer, batch_size, rank=rank, world_size=world_size,
                         start=LoaderState.from_dict(state.to_dict()))
    loader = DataLoader(stream, batch_size=None, num_workers=readers if workers else 0, pin_memory=pin_memory,
                        prefetch_factor=4 if workers else None)
    for reader in range(readers):
        state.epochs.setdefault(reader, 0)
    fruitless: set[int] = set()  # readers whose last epoch gave no batch
    source = iter(loader)
    try:
        for item in source:
            if item["reader"] != state.next_reader:
                raise RuntimeError(f"the DataLoader handed out reader {item['reader']}'s item in reader "
                                   f"{state.next_reader}'s turn: the data order would not resume")
            empty = bool(item.get("end")) and not state.batches.get(item["reader"], 0)
            state.update(item, readers)
            if not item.get("end"):
                fruitless.discard(item["reader"])
                yield item
            elif empty:
                fruitless.add(item["reader"])
                if len(fruitless) == readers:
                    raise ValueError(f"epoch {item['epoch']} gave no full batch of {batch_size} on rank {rank}: "
                                     f"too few training rows ({spec.shards.rows} in {spec.shards.shards} shards, "
                                     f"before holdout and curation); lower --batch_size")
    finally:
        del source  # its workers shut down with it


def counts_summary(counts: dict[str, int]) -> dict[str, int]:
    """Text sources and skip counters in a fixed order, zeros included, for logs and metrics."""
    keys = [f"text_{s}" for s in SOURCES] + ["corrupt_images", "curated_out", "truncated_texts", "dropped_partial"]
    return {k: int(counts.get(k, 0)) for k in keys}
