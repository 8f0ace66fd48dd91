"""Export as a Beam job: final pairs to shuffled, size-bounded training shards, a WebDataset twin and a data card.

Three steps, and the first writes nothing:
1. Check the input (manifest checksums, schema, nulls, duplicate keys,
   missing images) and plan the shards: rows in the order of a hash of
   (seed, key), cut every `target_bytes` of estimated row size.
2. A Beam reshuffle keyed by that plan: every input batch is split by the
   output shard its rows belong to, grouped by shard index, sorted by hash
   and written (the tar twin first, the Parquet file last, both atomically).
   Shards already on disk from a killed run are skipped; the plan does not
   depend on them, so the rerun's bytes equal an uninterrupted run's.
3. The data card and the manifest (last).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curation.datacard import write_datacard, upstream_stages
from curation.export import (
    PLAN_FILE, STAGE, WEBDATASET_DIR, ExportConfig, ExportPlan, parquet_name, plan_export, route_batch, shard_done,
    tar_name, verify_export, write_shard,
)
from curation.failed_checks import verify_input
from curation.output_lock import output_lock
from curation.schema import SCHEMA_VERSION
from curation.shards import (
    ShardInfo, atomic_write_bytes, file_sha256, info_for, is_complete, shard_paths,
    write_manifest,
)
from pipelines.common import (
    STAGE_CONFIG, ReadShardBatches, ShardStageOptions, StageConfigMismatch, begin_stage, finished_from,
    manifest_listing, refuse_overlap, resized_since_manifest, say_remade,
)
from pipelines.runner import StageResult, pipeline_for, print_summary, refuse_unknown_flags

MB = 1024 * 1024


class ExportOptions(ShardStageOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        defaults = ExportConfig()
        parser.add_argument("--shard_mb", type=float, default=defaults.target_bytes / MB,
                            help="Target size of a training shard in MiB (64..1024; lower with --allow_small_shards).")
        parser.add_argument("--row_group_mb", type=float, default=defaults.row_group_bytes / MB,
                            help="Target size of a Parquet row group in MiB: the unit a streaming reader fetches.")
        parser.add_argument("--export_columns", default="",
                            help="Comma-separated optional columns to keep besides the training ones "
                                 "(url, sha256, source, width, height).")
        parser.add_argument("--webdataset", action="store_true",
                            help="Also write webdataset/{00000..N}.tar shards with the same rows, for open_clip.")
        parser.add_argument("--allow_small_shards", action="store_true",
                            help="Allow a shard target under 64 MiB (tests and demos).")


def config_from(options: ExportOptions) -> ExportConfig:
    if options.row_group_mb is None or options.row_group_mb <= 0:  # rounded up to a byte below, it was never 0
        raise ValueError(f"--row_group_mb must be positive, got {options.row_group_mb}")
    return ExportConfig(
        seed=options.seed,
        target_bytes=int(round(options.shard_mb * MB)),
        row_group_bytes=max(1, int(round(options.row_group_mb * MB))),
        keep_columns=tuple(c.strip() for c in options.export_columns.split(",") if c.strip()),
        webdataset=options.webdataset,
        small_shards=options.allow_small_shards,
    )


def _route(item, seed: int, boundaries: np.ndarray, wanted: frozenset[int]):
    _, (_, _, batch) = item
    yield from route_batch(batch, seed, boundaries, wanted)


def _write(group, output: str, config: ExportConfig) -> dict:
    index, parts = group
    return write_shard(output, index, parts, config)


def _claim_plan(output: Path, plan: ExportPlan) -> None:
    """Record the plan; refuse to add shards to an export that was cut from other input rows."""
    path = output / PLAN_FILE
    wanted = plan.to_json()
    if path.is_file() and json.loads(path.read_text()) != wanted:
        what = "an export" if is_complete(output) else "a partial export"
        raise StageConfigMismatch(f"{output} holds {what} of other input rows (its {PLAN_FILE} differs); "
                                  f"pass --overwrite to replace it")
    atomic_write_bytes(path, json.dumps(wanted).encode())


def _check_written(output: Path, plan: ExportPlan, config: ExportConfig) -> list[ShardInfo]:
    infos = []
    for index, rows in enumerate(plan.shard_rows):
        if not shard_done(output, index, config):
            raise RuntimeError(f"export shard {index} was not written to {output}")
        try:
            info = info_for(output / parquet_name(index))
        except (OSError, pa.ArrowInvalid) as exc:  # damaged since it was written, with no manifest to tell
            raise RuntimeError(f"{output / parquet_name(index)} cannot be read ({exc}); delete it and rerun to make "
                               f"it again") from exc
        if info.rows != rows:
            raise RuntimeError(f"{output / parquet_name(index)} has {info.rows} rows, the plan says {rows}")
        infos.append(info)
    return infos


def _webdataset_section(output: Path, plan: ExportPlan) -> dict:
    directory = output / WEBDATASET_DIR
    shards = [ShardInfo(tar_name(i), rows, (directory / tar_name(i)).stat().st_size,
                        file_sha256(directory / tar_name(i))) for i, rows in enumerate(plan.shard_rows)]
    pattern = f"{WEBDATASET_DIR}/{{00000..{plan.shards - 1:05d}}}.tar" if plan.shards else None
    return {"directory": WEBDATASET_DIR, "pattern": pattern,
            "rows": sum(plan.shard_rows), "bytes": sum(s.bytes for s in shards), "shards": [asdict(s) for s in shards]}


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> StageResult:
    refuse_unknown_flags(argv, ExportOptions)
    options = ExportOptions(argv)
    config = config_from(options)
    if not options.input or not options.output:
        raise ValueError(f"{STAGE}: --input and --output are required")
    refuse_overlap(STAGE, options.output, options.input)  # before planning reads every input row
    with output_lock(options.output, STAGE):  # one run at a time writes an output
        return _run(options, config, test_pipeline)


def _run(options: ExportOptions, config: ExportConfig, test_pipeline: beam.Pipeline | None) -> StageResult:
    start = time.perf_counter()
    # Up to date: planning would read every input row (and hashing every byte) only to find the shards made.
    if not options.overwrite and (kept := finished_from(options.input, options.output, STAGE, asdict(config),
                                                        verify_output=verify_export)):
        return StageResult(kept, Path(options.output), up_to_date=True)
    # Checksums before anything is written, once: begin_stage takes the verified manifest.
    verified = verify_input(options.input) if is_complete(options.input) else None
    plan = plan_export(options.input, config, options.batch_rows)  # schema, nulls, keys, images
    planned = time.perf_counter()
    stage = begin_stage(options.input, options.output, STAGE, asdict(config), options.overwrite,
                        shardwise=False, verified=verified)  # the shards are cut from every input row
    output = stage.output
    _claim_plan(output, plan)
    resized, resized_tars = resized_since_manifest(output), resized_since_manifest(output, "webdataset")
    say_remade(STAGE, resized | {f"{WEBDATASET_DIR}/{name}" for name in resized_tars})
    todo = [i for i in range(plan.shards) if not shard_done(output, i, config) or parquet_name(i) in resized
            or (config.webdataset and tar_name(i) in resized_tars)]
    # Up to date: the run that wrote the shards keeps its manifest, data card and figures.
    if not todo and (kept := manifest_listing(output, [parquet_name(i) for i in range(plan.shards)])) is not None:
        return StageResult(kept, output, up_to_date=True)
    if todo:
        inputs = [(i, str(p)) for i, p in enumerate(shard_paths(options.input))]
        boundaries = np.array(plan.boundaries, dtype=np.uint64)
        with pipeline_for(options, test_pipeline) as p:
            _ = (p
                 | ReadShardBatches(inputs, options.batch_rows, config.columns)
                 | "RouteByHash" >> beam.FlatMap(_route, config.seed, boundaries, frozenset(todo))
                 | "Reshuffle" >> beam.GroupByKey()
                 | "WriteShard" >> beam.Map(_write, str(output), config))
    shards = _check_written(output, plan, config)
    written = time.perf_counter()
    total_bytes = sum(s.bytes for s in shards)
    made_now = set(todo)
    written_bytes = sum(s.bytes for i, s in enumerate(shards) if i in made_now)  # a resume's kept shards took no time
    card = write_datacard(output, records=upstream_stages(options.input, STAGE_CONFIG),
                          shards=[output / s.name for s in shards],
                          export_summary={"rows": plan.input_rows, "shards": plan.shards, "bytes": total_bytes,
                                          "seed": config.seed, "schema_version": SCHEMA_VERSION,
                                          "target_bytes": config.target_bytes})
    extra = {"webdataset": _webdataset_section(output, plan)} if config.webdataset else {}
    elapsed = time.perf_counter() - start
    manifest = write_manifest(
        output, stage=STAGE, config=asdict(config), shards=shards,
        lineage=(stage.input_manifest or {}).get("lineage", []),
        seed=config.seed, columns=config.columns, rejects={"rows": 0, "by_reason": {}},
        datacard={"file": card["datacard"], "plots": card["plots"]}, **extra,
        stats={"rows_in": plan.input_rows, "rows_out": sum(s.rows for s in shards), "input_shards": plan.input_shards,
               "shards": plan.shards, "resumed_shards": plan.shards - len(todo), "seconds": round(elapsed, 3),
               "check_and_plan_seconds": round(planned - start, 3), "write_seconds": round(written - planned, 3),
               "mb_per_s": round(written_bytes / MB / max(elapsed, 1e-9), 2),
               "estimated_bytes": plan.stats["estimated_bytes"], "datacard": card["datacard"], "plots": card["plots"],
               "caption_lengths": card["caption_lengths"]})
    return StageResult(manifest, output)


def main(argv: list[str] | None = None) -> None:
    result = run(argv)
    print_summary(result)
    print(f"[{STAGE}] data card: {result.output / result.manifest['datacard']['file']}")
    if result.manifest.get("webdataset", {}).get("pattern"):
        print(f"[{STAGE}] open_clip: --train-data '{result.output / result.manifest['webdataset']['pattern']}'")


def demo_flags(workdir: Path) -> list[str]:
    """A shard target small enough that the demo's few MB make several shards, and the tar twin."""
    return ["--shard_mb", "0.5", "--row_group_mb", "0.125", "--allow_small_shards", "--webdataset"]
