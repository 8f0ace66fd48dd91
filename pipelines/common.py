"""What every Beam job shares: options, reading shards, writing shards, and the stage lifecycle.

Output shard i is made from input shard i, so a rerun knows exactly which
input shards are finished (their output exists under its final name) and
processes only the rest. Within a shard, rows are sorted by key before they
are written, so the bytes do not depend on the runner, the worker count or
the order in which elements arrived.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from curation.failed_checks import verify_input
from curation.rejects import REJECT_SCHEMA, count_reasons
from curation.schema import PAIR_SCHEMA, SchemaError
from curation.shards import (
    STAGE_CONFIG, TEMP_GLOB, ManifestError, atomic_write_bytes, finished_shards, info_for, is_complete, open_parquet,
    read_manifest, refuse_unfinished, remove_stale_temps, shard_name, shard_paths, verify_manifest, write_manifest,
    write_table_atomic,
)

REJECTS_DIR = "rejects"


def positive_int(text: str) -> int:
    """An argparse type for counts and sizes: 0 or less was taken (a batch of no rows read nothing; shards
    per run of 0 ran one) or failed deep in Beam, far from the flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class ShardStageOptions(PipelineOptions):
    """Flags every stage takes. Each stage subclasses this with its own flags."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        # Not argparse-required: Beam parses every options class against every pipeline's flags.
        parser.add_argument("--input", help="Directory of the previous stage's Parquet shards (required); for "
                                            "ingest, raw Parquet shards, an img2dataset output folder or an "
                                            "image folder (or --url_list instead).")
        parser.add_argument("--output", help="Directory for this stage's shards and manifest (required).")
        parser.add_argument("--seed", type=int, default=0, help="Seed for every random choice of the stage.")
        parser.add_argument("--batch_rows", type=positive_int, default=512, help="Rows per record batch between steps.")
        parser.add_argument("--overwrite", action="store_true",
                            help="Delete a previous output instead of resuming or refusing it.")


class StageConfigMismatch(RuntimeError):
    """The output directory holds a run of the same stage with another config."""


@dataclass
class StagePlan:
    """Which input shards still need work, decided before the pipeline is built."""

    output: Path
    todo: list[tuple[int, str]]
    done: int
    up_to_date: bool = False
    input_manifest: dict | None = field(default=None, repr=False)
    kept: bool = False  # set by finish_stage: the manifest of the run that made the output was kept


def with_new_options_off(previous: dict, wanted: dict) -> dict:
    """The recorded run, with the options a later version added and this run leaves off (False or None) read
    as off: that is what the older run did, and refusing it would make its users redo a whole stage."""
    config = previous.get("config")
    if not isinstance(config, dict) or not isinstance(wanted.get("config"), dict):
        return previous
    added = {name: value for name, value in wanted["config"].items()
             if name not in config and (value is False or value is None)}
    return {**previous, "config": {**config, **added}} if added else previous


def recorded_run(input_dir: str | Path, stage: str, config: dict, inputs: list[Path], input_manifest: dict | None
                 ) -> dict:
    """What `_stage_config.json` records of a run: stage, input, its shards' identities and the config (as JSON)."""
    return json.loads(json.dumps({"stage": stage, "input": str(Path(input_dir).resolve()),
                                  "input_shards": input_identity(inputs, input_manifest), "config": config},
                                 default=str))


def json_object_flag(text: str | None, flag: str) -> dict:
    """A flag that holds a JSON object (engine options), or an error naming the flag."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def finished_from(input_dir: str | Path, output_dir: str | Path, stage: str, config: dict,
                  verify_output: Callable[..., dict] = verify_manifest) -> dict | None:
    """The output's manifest if it is finished and recorded from this very input and config, else None.

    For a stage whose up-to-date check would otherwise read its whole input
    first (export plans from every row): the input's sizes and recorded
    sha256s are checked against its manifest, and the output's files by
    `verify_output(output, checksums=False)` (export's checks its tar twins
    too); no byte is read. Anything it cannot tell this way (no manifests, a
    record of an earlier format) is None: the stage then decides as usual.
    """
    output = Path(output_dir)
    recorded = output / STAGE_CONFIG
    if not (is_complete(input_dir) and is_complete(output) and recorded.is_file()):
        return None
    try:
        input_manifest = verify_input(input_dir, checksums=False)
        manifest = verify_output(output, checksums=False)
    except ManifestError:
        return None
    wanted = recorded_run(input_dir, stage, config, shard_paths(input_dir), input_manifest)
    previous = with_new_options_off(json.loads(recorded.read_text()), wanted)
    return manifest if previous == wanted else None


def refuse_overlap(stage: str, output_dir: str | Path, *reads: str | Path | None) -> None:
    """Refuse an --output that is, holds or sits inside what the stage reads (its input, metadata, local
    models), before anything is written: each stage's `run` calls it before taking the output's lock.

    --overwrite deletes the output first: an output holding the input deleted
    the input with it, and one equal to a manifest-less input labelled those
    very shards as this stage's output. An output inside the input would be
    published, and overwritten, with it.
    """
    output = Path(output_dir).resolve()
    for read in filter(None, reads):
        path = Path(read).resolve()
        if not path.exists():  # a hub model id, or an input the stage refuses itself
            continue
        if path == output or output in path.parents or path in output.parents:
            raise ValueError(f"{stage}: --output {output_dir} overlaps {read}, which this stage reads "
                             f"(--overwrite would delete it); choose an --output outside it")


def begin_stage(input_dir: str | Path, output_dir: str | Path, stage: str, config: dict, overwrite: bool = False,
                shardwise: bool = True, verified: dict | None = None,
                check: Callable[[list[Path]], None] | None = None) -> StagePlan:
    """Check the output against this run's config, clean stale temps, and list the shards left to do.

    A finished output with the same config is up to date; a finished or
    partial output with another config is refused (or wiped with overwrite),
    so two different builds never mix in one directory. An input that grew by
    new shards resumes only for a `shardwise` stage, one whose output shard i
    depends on input shard i alone: balance counts over the whole pool and
    dedup decides over all rows, so their finished shards are stale then.
    `verified` is the input's manifest if the caller has already checked its files against it; else the
    input's sha256s are checked here, before any work (for a finished output, only if there is work).
    `check(input shards)` (a curation.input_check.InputCheck) runs before anything is written, or, for a
    finished output's rerun, once there is work: it reads every shard's key column.
    """
    if not input_dir or not output_dir:
        raise ValueError(f"{stage}: --input and --output are required")
    # Check the input before writing anything, so bad input leaves no output directory behind.
    refuse_unfinished(input_dir)
    # A finished output's rerun is most often up to date, and then reads no input byte: its sizes are checked
    # now and the sha256 of every byte only once there is work (hashing a large pool takes hours).
    rerun = not overwrite and is_complete(output_dir)  # of a finished output: most often up to date
    deferred = verified is None and is_complete(input_dir) and rerun
    input_manifest = verified or (verify_input(input_dir, checksums=not deferred) if is_complete(input_dir)
                                  else None)
    inputs = shard_paths(input_dir)
    if not inputs:
        raise FileNotFoundError(f"no Parquet shards in {input_dir}")
    if check is not None and not rerun:
        check(inputs)
    output = Path(output_dir)
    if overwrite and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / REJECTS_DIR).mkdir(exist_ok=True)
    recorded = output / STAGE_CONFIG
    wanted = recorded_run(input_dir, stage, config, inputs, input_manifest)
    # A shard is done with its rejects: a deleted rejects file is made again, not left out of the counts.
    finished = {p.name for p in finished_shards(output)} & {p.name for p in finished_shards(output / REJECTS_DIR)}
    say_remade(stage, damaged := resized_since_manifest(output) & finished)
    finished -= damaged
    if recorded.is_file():
        previous = json.loads(recorded.read_text())
        before, now = previous.get("input_shards"), wanted["input_shards"]
        if before and all(len(shard) == 2 for shard in before) and [s[:2] for s in now[:len(before)]] == before:
            before = now[:len(before)]  # recorded as [name, size] by earlier versions, and those still match
        # Recorded before input identities were, or, for a shardwise stage, an input whose shards with a
        # finished output are unchanged (it grew by new shards, or a shard not done yet was rebuilt: the one
        # that stopped the run, say): compared without the others, and the input as it is now recorded.
        resumable = shardwise and before is not None and len(now) >= len(before) and all(
            now[i] == before[i] for i in range(len(before)) if shard_name(i) in finished)
        if before is None or resumable or before == now:
            previous = {**previous, "input_shards": now}
        previous = with_new_options_off(previous, wanted)
        # A run that made nothing (it failed before its first shard: a mistyped model path, say) holds no
        # work to protect: its record is replaced, where its corrected rerun was refused as another config.
        if previous != wanted and _made_anything(output):
            raise config_mismatch(output, previous, wanted)
    todo = [(i, str(p)) for i, p in enumerate(inputs) if shard_name(i) not in finished]
    if rerun and todo:  # there is work after all: the input is checked before any, and before the record
        if deferred:
            verify_manifest(input_dir)
        if check is not None:
            check(inputs)
    if not recorded.is_file() or json.loads(recorded.read_text()) != wanted:
        atomic_write_bytes(recorded, json.dumps(wanted, indent=2, default=str).encode())
    for directory in (output, *(path for path in output.iterdir() if path.is_dir())):  # rejects, stats, matches...
        remove_stale_temps(directory)
    return StagePlan(output, todo, len(inputs) - len(todo), up_to_date=is_complete(output) and not todo,
                     input_manifest=input_manifest)


def _made_anything(output: Path) -> bool:
    """Whether the output holds a file a run wrote besides its record (a shard, a reject, a match, a download);
    temp files of a killed write do not count."""
    return any(path.is_file() and path.name != STAGE_CONFIG and not fnmatch.fnmatch(path.name, TEMP_GLOB)
               for path in output.rglob("*"))


def shard_runs(todo: list[tuple[int, str]], per_run: int,
               test_pipeline: object | None) -> list[list[tuple[int, str]]]:
    """The shards to do, in pipeline runs of `per_run` (all in one with a test's pipeline, which runs once).
    A run's shards are written when its last one is done, so a failure keeps every earlier run's."""
    step = len(todo) if test_pipeline is not None else max(1, per_run)
    return [todo[first:first + step] for first in range(0, len(todo), step)]


def input_identity(inputs: list[Path], manifest: dict | None) -> list:
    """What the output is computed from, shard by shard, so an input rebuilt under the same path no longer
    resumes into the old output, while one that grew by new shards does: name, size and, from the input's
    manifest (already verified against the files), the sha256; without a manifest, the modification time."""
    recorded = {s["name"]: s["sha256"] for s in (manifest or {}).get("shards", [])}
    return [[path.name, path.stat().st_size, recorded.get(path.name) or path.stat().st_mtime_ns] for path in inputs]


def config_mismatch(output: Path, previous: dict, wanted: dict) -> StageConfigMismatch:
    """The error for an output made with another input or config, naming the keys that differ."""
    changed = _differences(previous, wanted)
    return StageConfigMismatch(
        f"{output} holds a run of the {previous.get('stage', wanted.get('stage'))} stage with another input or config "
        f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} differ); "
        f"pass --overwrite to replace it or choose another --output")


def _differences(old: object, new: object, where: str = "") -> list[str]:
    """The dotted keys whose values differ between two recorded stage configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))]
    return [] if old == new else [where or "config"]


def write_stage_shard(output: str | Path, index: int, pairs: pa.Table, rejects: pa.Table | None = None,
                      schema: pa.Schema = PAIR_SCHEMA) -> dict:
    """Write shard `index` (sorted by key) and its rejects; the pair shard last, as the commit point."""
    output = Path(output)
    rejects = rejects if rejects is not None else REJECT_SCHEMA.empty_table()
    write_table_atomic(rejects.cast(REJECT_SCHEMA).sort_by("key"), output / REJECTS_DIR / shard_name(index))
    pairs = pairs.sort_by("key")
    if set(schema.names) <= set(pairs.column_names):
        pairs = pairs.select(schema.names + [c for c in pairs.column_names if c not in schema.names])
    info = write_table_atomic(pairs, output / shard_name(index))
    return asdict(info)


class ReadShardBatches(beam.PTransform):
    """(shard index, (path, row offset, RecordBatch)) for every shard still to do.

    An empty shard yields one empty batch, so it still reaches the writer and
    gets its (empty) output shard.
    """

    def __init__(self, todo: Iterable[tuple[int, str]], batch_rows: int = 512, columns: list[str] | None = None):
        super().__init__()
        self.todo, self.batch_rows, self.columns = list(todo), batch_rows, columns

    def expand(self, pbegin):
        return (pbegin
                | "ShardList" >> beam.Create(self.todo)
                | "Spread" >> beam.Reshuffle()
                | "Read" >> beam.FlatMap(_read_shard, self.batch_rows, self.columns))


def _read_shard(item: tuple[int, str], batch_rows: int, columns: list[str] | None):
    """The shard's batches, of `columns` this file has (a stage column it lacks is the reader's to fill)."""
    index, path = item
    parquet = open_parquet(path)  # Beam's own message names no file
    if columns is not None:
        columns = [c for c in columns if c in parquet.schema_arrow.names]
    offset = 0
    batches = parquet.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as exc:  # a damaged page past the footer
            raise SchemaError(f"unreadable after row {offset} ({exc})", file=str(path)) from exc
        if batch is None:
            break
        yield index, (path, offset, batch)
        offset += batch.num_rows
    if offset == 0:
        yield index, (path, 0, pa.RecordBatch.from_pylist([], schema=parquet.schema_arrow))


class WriteShards(beam.PTransform):
    """Group (index, (kind, table)) by shard index, then write each shard and its rejects atomically.

    `kind` is "pairs" or "rejects". Every index that reaches this transform
    gets a shard, even an empty one, so the shard count matches the input.
    """

    def __init__(self, output: str | Path, schema: pa.Schema = PAIR_SCHEMA):
        super().__init__()
        self.output, self.schema = str(output), schema

    def expand(self, pcoll):
        return (pcoll
                | "ByShard" >> beam.GroupByKey()
                | "Write" >> beam.Map(_write_group, self.output, self.schema))


def _write_group(group: tuple[int, Iterable[tuple[str, pa.Table | pa.RecordBatch]]], output: str,
                 schema: pa.Schema) -> dict:
    index, parts = group
    pairs, rejects = [], []
    for kind, part in parts:
        table = part if isinstance(part, pa.Table) else pa.Table.from_batches([part])
        (pairs if kind == "pairs" else rejects).append(table)
    pair_table = pa.concat_tables(pairs, promote_options="default") if pairs else schema.empty_table()
    reject_table = pa.concat_tables(rejects) if rejects else None
    return write_stage_shard(output, index, pair_table, reject_table, schema)


def resized_since_manifest(output: Path, section: str | None = None) -> set[str]:
    """The files the output's manifest lists (in its `section`, such as export's tar twins, if given) that
    exist but no longer have the size it recorded: a bad copy, a disk error, a hand edit. A rerun makes
    them again, where it found every file there, called the output up to date and left the next stage to
    refuse it. Sizes only, a stat per file: a sha256 of every byte on each rerun would take hours."""
    try:
        manifest = read_manifest(output)
    except ManifestError:
        return set()
    listing = manifest.get(section) if section else manifest
    if not isinstance(listing, dict) or not isinstance(listing.get("shards"), list):
        return set()
    directory = output / listing.get("directory", "")
    return {s["name"] for s in listing["shards"]
            if (directory / s["name"]).is_file() and (directory / s["name"]).stat().st_size != s["bytes"]}


def say_remade(stage: str, names: Iterable[str]) -> None:
    if names := sorted(names):
        print(f"[{stage}] {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} no longer match(es) the "
              f"manifest's sizes: making them again")


def manifest_listing(output: Path, names: list[str]) -> dict | None:
    """The output's manifest if it is readable and lists exactly the shards `names`; else None (to write)."""
    try:
        manifest = read_manifest(output)
    except ManifestError:
        return None
    return manifest if [s.get("name") for s in manifest.get("shards", [])] == names else None


def kept_manifest(plan: StagePlan) -> dict | None:
    """The manifest of the run that made an up-to-date output, if it still lists exactly its shards: a run
    with nothing to do keeps it, so its timings, counts and creation time still say how the shards were made."""
    if not plan.up_to_date:
        return None
    return manifest_listing(plan.output, [p.name for p in finished_shards(plan.output)])


def finish_stage(plan: StagePlan, stage: str, config: dict, warnings: list[str] | None = None, **stats) -> dict:
    """Write the manifest over every finished shard, with rejects counted by reason, the lineage carried on and
    any `warnings` for its readers (or keep the one an up-to-date output has, see kept_manifest)."""
    if (kept := kept_manifest(plan)) is not None:
        plan.kept = True
        return kept
    shards = [info_for(p) for p in finished_shards(plan.output)]
    reject_paths = finished_shards(plan.output / REJECTS_DIR)
    rejects = pa.concat_tables([pq.read_table(p) for p in reject_paths]) if reject_paths else REJECT_SCHEMA.empty_table()
    lineage = (plan.input_manifest or {}).get("lineage", [])
    return write_manifest(plan.output, stage=stage, config=config, shards=shards, lineage=lineage,
                          rejects={"rows": rejects.num_rows, "by_reason": count_reasons(rejects)}, stats=stats,
                          **({"warnings": warnings} if warnings else {}))
