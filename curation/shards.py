"""Parquet shards: atomic writes, deterministic names, a manifest written last, and resume.

Invariants every stage relies on:
- A shard is visible under its final name only once it is complete: it is
  written to a hidden temp file and renamed, so a killed run leaves no
  half-written shard behind.
- `manifest.json` is written after every shard and says the stage is done.
- Names are `part-00000.parquet`, `part-00001.parquet`, ...: the same input
  gives the same names, so a rerun can tell which shards are finished.
- Readers stream record batches and never hold a dataset in memory.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation import __version__
from curation.schema import PAIR_SCHEMA, KeyTracker, SchemaError, validate

MANIFEST = "manifest.json"
# Beside a stage's output: the stage, its input directory and config (`pipelines.common.begin_stage` writes it).
STAGE_CONFIG = "_stage_config.json"
# Left in an output that a run asked to overwrite, until its job's wipe deletes it (assets.stages says why);
# no output file: publishing and the trainer's own checks pass it over.
OVERWRITE_SENTINEL = ".overwrite-pending"
DEFAULT_TARGET_BYTES = 256 * 1024 * 1024
DEFAULT_ROW_GROUP_ROWS = 1024


class ManifestError(RuntimeError):
    """A manifest that is missing, unreadable or does not match the files beside it."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str


def shard_name(index: int, prefix: str = "part") -> str:
    return f"{prefix}-{index:05d}.parquet"


def file_identity(path: str | Path) -> tuple[str, int, int, int]:
    """A file's path, inode, modification time and size: what an in-process cache of its contents is keyed
    on, so a file rewritten under the same path (an --overwrite run in the same process) is read again."""
    info = os.stat(path)
    return str(path), info.st_ino, info.st_mtime_ns, info.st_size


def files_fingerprint(paths: Iterable[str | Path]) -> dict:
    """What a source of files is, cheaply: how many, and a sha256 over each one's resolved path, size and
    modification time. Recorded in a stage's config, so a list or folder that changed since a run is not
    resumed into (its finished shards were made from the old files)."""
    listing = []
    for path in paths:
        info = os.stat(path)
        listing.append([str(Path(path).resolve()), info.st_size, info.st_mtime_ns])
    return {"files": len(listing), "sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What `_temp_path` names: a write not finished yet, or left by a killed run.
TEMP_GLOB = ".*.tmp-*"


def _temp_path(path: Path) -> Path:
    """Unique per write, not per process: containerised workers on a shared filesystem often share a pid
    (1), and two retries of one shard must not write the same temp file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _publish(tmp: Path, path: Path) -> None:
    """Rename the synced temp file into place, then sync the directory, so the rename survives a power
    loss too (a manifest written after it must not name a shard that is not there)."""
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _publish(tmp, path)


def atomic_write_figure(figure, path: str | Path, **savefig_options) -> None:
    """A matplotlib figure as a PNG, written like every other file: a killed run leaves no truncated plot."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig_options)
    atomic_write_bytes(path, buffer.getvalue())


def info_for(path: str | Path) -> ShardInfo:
    path = Path(path)
    return ShardInfo(path.name, pq.ParquetFile(path).metadata.num_rows, path.stat().st_size, file_sha256(path))


def write_table_atomic(table: pa.Table, path: str | Path, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> ShardInfo:
    """Write one complete shard: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    pq.write_table(table, tmp, row_group_size=row_group_rows, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _publish(tmp, path)
    return info_for(path)


def write_parts_atomic(parts: Iterable[pa.Table], schema: pa.Schema, path: str | Path) -> ShardInfo:
    """One complete shard written part by part (a row group each), so only one part is ever in memory:
    a shard of ten thousand photos is gigabytes. Temp file, fsync, rename, as `write_table_atomic`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for part in parts:
                writer.write_table(part)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, path)
    return info_for(path)


def remove_stale_temps(directory: str | Path) -> None:
    """Temp files of a killed run are garbage: nothing refers to them."""
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.glob(TEMP_GLOB):
            tmp.unlink(missing_ok=True)


def finished_shards(directory: str | Path, prefix: str = "part") -> list[Path]:
    """Complete shards, in index order, ignoring temp files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{prefix}-*.parquet") if not p.name.startswith("."))


class ShardWriter:
    """Streams rows into size-bounded shards; with `resume`, continues a killed run exactly.

    Resume relies on the caller feeding the same rows in the same order (every
    stage derives its order from its input and seed, never from time or
    scheduling). The writer then skips as many rows as the finished shards hold
    and carries on at the next shard index, so no row is written twice or lost.
    """

    def __init__(self, directory: str | Path, schema: pa.Schema = PAIR_SCHEMA, *, rows_per_shard: int | None = None,
                 target_bytes: int = DEFAULT_TARGET_BYTES, prefix: str = "part",
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS, resume: bool = True):
        if rows_per_shard is not None and rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        if target_bytes <= 0:
            raise ValueError(f"target_bytes must be positive, got {target_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema, self.prefix = schema, prefix
        self.rows_per_shard, self.target_bytes, self.row_group_rows = rows_per_shard, target_bytes, row_group_rows
        remove_stale_temps(self.directory)
        existing = finished_shards(self.directory, prefix) if resume else []
        if not resume:
            for path in finished_shards(self.directory, prefix):
                path.unlink()
        self.shards: list[ShardInfo] = [info_for(p) for p in existing]
        self._skip = sum(s.rows for s in self.shards)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    @property
    def resumed_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def write(self, data: pa.Table | pa.RecordBatch | list[dict]) -> None:
        if isinstance(data, list):
            data = pa.Table.from_pylist(data, schema=self.schema)
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        if self._skip:
            dropped = min(self._skip, table.num_rows)
            table = table.slice(dropped)
            self._skip -= dropped
        for batch in table.to_batches(max_chunksize=self.row_group_rows):
            self._add(batch)

    def _add(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            take = batch.num_rows
            if self.rows_per_shard is not None:
                take = min(take, self.rows_per_shard - self._pending_rows)
            head, batch = batch.slice(0, take), batch.slice(take)
            self._pending.append(head)
            self._pending_rows += head.num_rows
            self._pending_bytes += head.nbytes
            if self._full():
                self._flush()

    def _full(self) -> bool:
        if self.rows_per_shard is not None and self._pending_rows >= self.rows_per_shard:
            return True
        return self._pending_bytes >= self.target_bytes

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        table = pa.Table.from_batches(self._pending).cast(self.schema)
        path = self.directory / shard_name(len(self.shards), self.prefix)
        self.shards.append(write_table_atomic(table, path, self.row_group_rows))
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    def close(self) -> list[ShardInfo]:
        self._flush()
        return list(self.shards)


def manifest_fingerprint(manifest: dict) -> str:
    """One hash of a stage output's shard checksums: the same files give the same fingerprint."""
    return hashlib.sha256(json.dumps([s["sha256"] for s in manifest["shards"]]).encode()).hexdigest()


def write_manifest(directory: str | Path, *, stage: str, config: dict, shards: list[ShardInfo],
                   lineage: list[dict] | None = None, **extra) -> dict:
    """Write manifest.json last, atomically: its presence means the stage finished.

    The stage's lineage record names its shards by fingerprint, so a later stage can tell the output it
    was made from from one rebuilt since under the same path (training's entry counts, say)."""
    directory = Path(directory)
    listed = [asdict(s) for s in shards]
    own = {"stage": stage, "config": config, "code_version": __version__,
           "shards_fingerprint": manifest_fingerprint({"shards": listed})}
    manifest = {
        "schema_version": PAIR_SCHEMA.metadata[b"clip_curation.schema_version"].decode(),
        "stage": stage,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": __version__,
        "config": config,
        "rows": sum(s.rows for s in shards),
        "bytes": sum(s.bytes for s in shards),
        "shards": listed,
        "lineage": [*(lineage or []), own],
        **extra,
    }
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False, default=str).encode())
    return manifest


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST} in {directory}: the stage that writes it has not finished")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    _check_listing(path, manifest)
    return manifest


# What every reader of a manifest relies on, per listed shard.
_SHARD_FIELDS = {"name": str, "rows": int, "bytes": int, "sha256": str}


def _check_listing(path: Path, manifest: object) -> None:
    """Refuse a manifest whose shard list is not one readers can use (edited by hand, or written by another
    tool): it failed as a bare KeyError or TypeError, far from the file."""
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        raise ManifestError(f"{path} has no list of shards (a \"shards\" key): it is no manifest this "
                            f"pipeline wrote; rerun the stage that made {path.parent}")
    for i, shard in enumerate(shards):
        bad = [name for name, kind in _SHARD_FIELDS.items()
               if not isinstance(shard, dict) or not isinstance(shard.get(name), kind) or isinstance(shard.get(name), bool)]
        if bad:
            raise ManifestError(f"{path}: shard {i} of the manifest lacks a valid {', '.join(bad)}; rerun the stage "
                                f"that made {path.parent}")
    # Counted once each: list.count per name took 14 s for a 40,000-shard manifest, read on every stage.
    names = collections.Counter(shard["name"] for shard in shards)
    if repeated := sorted(name for name, n in names.items() if n > 1):
        raise ManifestError(f"{path} lists {', '.join(repeated[:3])} more than once: every reader would see its rows "
                            f"twice; rerun the stage that made {path.parent}")
    if isinstance(manifest.get("rows"), int) and manifest["rows"] != sum(shard["rows"] for shard in shards):
        raise ManifestError(f"{path} says {manifest['rows']} rows, its shards {sum(s['rows'] for s in shards)}: it was "
                            f"edited or written by another tool; rerun the stage that made {path.parent}")


def verify_manifest(directory: str | Path, checksums: bool = True) -> dict:
    """Refuse a dataset whose files do not match their manifest: sizes always, sha256s unless `checksums`
    is false (a stat per file, where hashing would read every byte)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = {shard["name"] for shard in manifest["shards"]}
    if unlisted := [p.name for p in finished_shards(directory) if p.name not in listed]:
        raise ManifestError(f"{directory} holds {', '.join(unlisted[:3])}{' ...' if len(unlisted) > 3 else ''}, which "
                            f"its manifest does not list: a run that has not finished, or files copied in since; "
                            f"no reader would see their rows. Rerun the stage that made it, or remove them")
    for shard in manifest["shards"]:
        path = directory / shard["name"]
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        if (size := path.stat().st_size) != shard["bytes"]:
            raise ManifestError(f"{path} holds {size} bytes, its manifest {shard['bytes']}, so it does not match its "
                                f"manifest checksum (copied only in part, or rewritten since)")
        if checksums and file_sha256(path) != shard["sha256"]:
            raise ManifestError(f"{path} does not match its manifest checksum")
        if checksums and (rows := pq.ParquetFile(path).metadata.num_rows) != shard["rows"]:
            raise ManifestError(f"{path} holds {rows} rows, its manifest {shard['rows']}")
    return manifest


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def refuse_unfinished(directory: str | Path) -> None:
    """Refuse another stage's output that has its stage config but no manifest: read, it is part of its rows."""
    if (Path(directory) / STAGE_CONFIG).is_file() and not is_complete(directory):
        raise ValueError(f"{directory} is the output of a stage that has not finished (it has {STAGE_CONFIG} but "
                         f"no manifest.json); rerun that stage to the end first")


def shard_paths(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """Shard files of a dataset directory (manifest order if there is one), a file, or a list of files."""
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.is_file():
            return [source]
        if not source.is_dir():
            raise FileNotFoundError(f"no shards at {source}")
        if is_complete(source):
            return [source / s["name"] for s in read_manifest(source)["shards"]]
        return finished_shards(source) or sorted(p for p in source.glob("*.parquet") if not p.name.startswith("."))
    return [Path(p) for p in source]


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """The file opened (its footer read), or a SchemaError naming it: pyarrow's own message names no file."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"not a readable Parquet file ({exc})", file=str(path)) from exc


def iter_batches(source: str | Path | Iterable[str | Path], *, columns: list[str] | None = None,
                 batch_rows: int = DEFAULT_ROW_GROUP_ROWS, check: bool = True) -> Iterator[tuple[Path, pa.RecordBatch]]:
    """Stream (shard path, record batch); with `check`, validate schema, nulls and key uniqueness on the way."""
    check = check and columns is None  # a projection cannot be checked against the whole schema
    keys = KeyTracker.new() if check else None
    for path in shard_paths(source):
        parquet = open_parquet(path)
        offset = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            if check:
                validate(pa.Table.from_batches([batch]), file=str(path), keys=keys, row_offset=offset)
            offset += batch.num_rows
            yield path, batch
    if keys is not None:
        keys.check()  # duplicate keys, once every key is in: raised after the last batch


def read_table(source: str | Path | Iterable[str | Path], columns: list[str] | None = None) -> pa.Table:
    """Whole dataset as one table: for tests and small outputs only."""
    paths = shard_paths(source)
    if not paths:
        return PAIR_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths], promote_options="default")
