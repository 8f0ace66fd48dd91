"""Ingest as a Beam job: raw rows to canonical pair shards plus rejects, with exact and near dedup.

Inputs (one of):
- `--input DIR` of Parquet shards with image bytes (the demo's raw pool, or your own files);
- `--input DIR` that is an img2dataset output folder (parquet or webdataset format);
- `--input DIR` of image files, with `--captions_file` or a `.txt` beside each image;
- `--url_list FILE_OR_DIR` (Parquet, CSV, TSV, JSONL): screened, then downloaded by img2dataset with its
  own distributor into `<output>/_staging/download`, then normalised here.

Dedup is a global decision made with a GroupByKey on each fingerprint
(the key itself, sha256, normalised URL, optional pHash bands), the smallest
key winning (of rows with one key: the first shard), so
every shard is normalised on every run (a resumed run too) while only the
shards still missing are written: a rerun gives exactly the uninterrupted
output.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from curation.dedup import (RENAMED_COLUMN, DedupConfig, decide_key, drop_duplicates, losers_in_group, renamed,
                            row_fingerprints, strongest)
from curation.download import (
    DownloadConfig, ListConfig, download_stats, downloads_by_list_shard, drop_torn_shards, join_downloads,
    read_downloads, run_img2dataset, stage_url_list, unfinished_shards,
)
from curation.folders import (
    check_img2dataset_folder, image_files, input_kind, refuse_unread_parquet, stage_image_folder, tar_images,
)
from curation.ingest import (
    ERROR, IMG2DATASET_COLUMNS, INPUT_ROW, INTERNAL_COLUMNS, ORIGIN_FILE, ORIGIN_LINE, STAGE, STAGED_COLUMNS, STATUS,
    IngestConfig, QualityFilters, duplicate_counts, extras_schema, filter_counts, normalise_batch, with_extras,
)
from curation.output_lock import output_lock
from curation.rejects import rejects_table
from curation.schema import KeyTracker, SchemaError
from curation.shards import file_identity, files_fingerprint, finished_shards, open_parquet, read_table, shard_paths
from curation.url_lists import Layout, is_url_list, list_files
from pipelines.common import (
    REJECTS_DIR, ReadShardBatches, ShardStageOptions, begin_stage, finish_stage, kept_manifest, refuse_overlap,
    write_stage_shard,
)
from pipelines.ingest_staging import STAGING, refuse_other_run, stage_missing
from pipelines.runner import StageResult, pipeline_for, print_summary, refuse_unknown_flags


class IngestOptions(ShardStageOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        defaults, filters, download = IngestConfig(), QualityFilters(), DownloadConfig()
        parser.add_argument("--key_column", default=defaults.key_column)
        parser.add_argument("--url_column", default=defaults.url_column)
        parser.add_argument("--caption_column", default=defaults.caption_column)
        parser.add_argument("--image_column", default=defaults.image_column)
        parser.add_argument("--max_caption_chars", type=int, default=defaults.max_caption_chars)
        # Sources other than Parquet shards.
        parser.add_argument("--url_list", help="A URL list (Parquet/CSV/TSV/JSONL) or a directory of them; "
                                               "downloaded with img2dataset. Replaces --input.")
        parser.add_argument("--url_list_format", choices=("parquet", "csv", "tsv", "jsonl"), default=None)
        parser.add_argument("--url_list_columns", default="",
                            help="Comma-separated column names of a CSV/TSV list that has no header row "
                                 "(CC3M, CC12M: url,caption).")
        parser.add_argument("--url_list_quoting", choices=("csv", "none"), default=None,
                            help="Read \"...\" fields as CSV quoting (csv) or as text (none). "
                                 "Default: csv for CSV, none for TSV.")
        parser.add_argument("--list_shard_rows", type=int, default=10_000, help="List rows per shard.")
        parser.add_argument("--allow_private_network", action="store_true",
                            help="Fetch loopback/private/link-local hosts too (SSRF risk; see README).")
        parser.add_argument("--allow_file_urls", action="store_true", help="Fetch file:// URLs too (SSRF risk).")
        parser.add_argument("--captions_file", help="For --input DIR of images: file,caption rows.")
        parser.add_argument("--captions_file_column", default="file")
        # img2dataset, passed through.
        parser.add_argument("--download_image_size", type=int, default=download.image_size)
        parser.add_argument("--download_resize_mode", default=download.resize_mode)
        parser.add_argument("--download_encode_format", default=download.encode_format)
        parser.add_argument("--download_processes", type=int, default=download.processes_count)
        parser.add_argument("--download_threads", type=int, default=download.thread_count)
        parser.add_argument("--download_timeout", type=int, default=download.timeout)
        parser.add_argument("--download_retries", type=int, default=download.retries)
        parser.add_argument("--download_min_image_size", type=int, default=download.min_image_size)
        parser.add_argument("--download_max_image_area", type=float, default=download.max_image_area)
        parser.add_argument("--download_incremental_mode", default=download.incremental_mode)
        parser.add_argument("--download_user_agent_token", default=None)
        parser.add_argument("--keep_download", action="store_true",
                            help="Keep img2dataset's output under <output>/_staging after a finished run.")
        # Dedup and quality filters.
        parser.add_argument("--no_dedup_sha256", action="store_true", help="Keep byte-identical images.")
        parser.add_argument("--no_dedup_url", action="store_true", help="Keep repeated URLs.")
        parser.add_argument("--near_dup_bits", type=int, default=-1,
                            help="Reject images whose 64-bit pHash is within this Hamming distance of a "
                                 "smaller key's; -1 (default) turns it off.")
        parser.add_argument("--filter_min_caption_chars", type=int, default=filters.min_caption_chars)
        parser.add_argument("--filter_max_caption_chars", type=int, default=filters.max_caption_chars)
        parser.add_argument("--filter_min_side", type=int, default=filters.min_side)
        parser.add_argument("--filter_max_aspect_ratio", type=float, default=filters.max_aspect_ratio)


def config_from(options: IngestOptions, image_column: str | None = None, staged: bool = False) -> IngestConfig:
    """The ingest config; `staged`: the rows come from staging, which writes `key`, `url`, `caption` and
    `image` whatever the list or captions file called them (the user's names were used reading those)."""
    names = ("key", "url", "caption", "image") if staged else \
        (options.key_column, options.url_column, options.caption_column, image_column or options.image_column)
    return IngestConfig(
        *names, options.max_caption_chars,
        filters=QualityFilters(options.filter_min_caption_chars, options.filter_max_caption_chars,
                               options.filter_min_side, options.filter_max_aspect_ratio),
        dedup=DedupConfig(not options.no_dedup_sha256, not options.no_dedup_url, options.near_dup_bits))


def download_config_from(options: IngestOptions) -> DownloadConfig:
    return DownloadConfig(
        image_size=options.download_image_size, resize_mode=options.download_resize_mode,
        encode_format=options.download_encode_format, processes_count=options.download_processes,
        thread_count=options.download_threads, timeout=options.download_timeout, retries=options.download_retries,
        min_image_size=options.download_min_image_size, max_image_area=options.download_max_image_area,
        incremental_mode=options.download_incremental_mode, user_agent_token=options.download_user_agent_token)


def _downloads(path: str | None, encode_format: str) -> dict[int, dict]:
    return _read_downloads(file_identity(path) if path else None, encode_format)


@functools.lru_cache(maxsize=2)
def _read_downloads(identity: tuple | None, encode_format: str) -> dict[int, dict]:
    """Keyed by the file's identity, not its path: an --overwrite run downloads again to the same path."""
    return read_downloads(Path(identity[0]) if identity else None, encode_format)


def _tar(path: str, encode_format: str) -> dict[str, bytes]:
    return _read_tar(file_identity(path), encode_format)


@functools.lru_cache(maxsize=2)
def _read_tar(identity: tuple, encode_format: str) -> dict[str, bytes]:
    return tar_images(identity[0], encode_format)


# The columns that steer normalisation, by input kind: none in a user's own shards (a `status` there is data),
# img2dataset's in its folders, staging's in a staged list or folder (where a list's own `txt` is data).
CONTROL_BY_KIND = {"shards": frozenset(), "img2dataset": IMG2DATASET_COLUMNS}


def _normalise(item, config: IngestConfig, source: dict):
    """(index, ("pairs"|"rejects", table)) for one batch; joins downloads or tar images first when needed."""
    index, (path, offset, batch) = item
    if source["kind"] == "url_list":
        rows = join_downloads(batch.to_pylist(), _downloads(source["downloads"].get(index), source["format"]),
                              source["format"])
        schema = batch.schema
        for column, kind in (("image", pa.binary()), (STATUS, pa.string()), (ERROR, pa.string())):
            if column not in schema.names:
                schema = schema.append(pa.field(column, kind))
        batch = pa.RecordBatch.from_pylist(rows, schema=schema)
    elif source["kind"] == "img2dataset" and config.image_column not in batch.schema.names:
        images = _tar(path, config.image_column)
        keys = batch.column(config.key_column).to_pylist()
        batch = batch.append_column(config.image_column, pa.array([images.get(k) for k in keys], pa.binary()))
    pairs, rejects = normalise_batch(batch, config, source=source["name"], file=path, row_offset=offset,
                                     control=CONTROL_BY_KIND.get(source["kind"], STAGED_COLUMNS))
    yield index, ("pairs", pairs)
    if rejects.num_rows:
        yield index, ("rejects", rejects)


def _row_prints(item, dedup: DedupConfig):
    index, (kind, table) = item
    if kind == "pairs" and table.num_rows:
        yield from row_fingerprints(table, index, dedup, order_by=INPUT_ROW)


KEPT_PRINTS = "kept_prints"


def _decide_key(group):
    """One key's rows decided once: (shard, ("loser", Loser)) and (shard, ("rename", (key, content, new
    key))) by shard, and on the KEPT_PRINTS output the content fingerprints of the rows that keep a key."""
    key = group[0]
    losers, renames, prints = decide_key(*group)
    for loser in losers:
        yield loser.shard, ("loser", loser)
    for shard, content, final in renames:
        yield shard, ("rename", (key, content, final))
    for kept in prints:
        yield beam.pvalue.TaggedOutput(KEPT_PRINTS, kept)


def _content_losers(group, near_dup_bits: int):
    name, members = group
    for loser in losers_in_group(name, members, near_dup_bits):
        yield loser.shard, ("loser", loser)


def _write_deduped(item, output: str, extras: pa.Schema) -> dict:
    index, grouped = item
    pairs, rejects = [], []
    for kind, table in grouped["parts"]:
        (pairs if kind == "pairs" else rejects).append(table)
    verdicts = grouped["verdicts"]
    table = renamed(pa.concat_tables(pairs, promote_options="default"),
                    [rename for kind, rename in verdicts if kind == "rename"])
    losers = strongest(loser for kind, loser in verdicts if kind == "loser")
    # A duplicate's reject names the file and row it came from, as every other reject of ingest does.
    kept, duplicates = drop_duplicates(table, losers, stage=STAGE, source=None, order_by=INPUT_ROW,
                                       origin=(ORIGIN_FILE, ORIGIN_LINE))
    return write_stage_shard(output, index, with_extras(kept.drop_columns(list(INTERNAL_COLUMNS)), extras),
                             pa.concat_tables([*rejects, duplicates]))


def _renamed_keys(output: Path) -> int:
    """Rows that got a new key because another row held theirs: those with `original_key` set."""
    total = 0
    for path in finished_shards(output):
        table = pq.read_table(path, columns=[RENAMED_COLUMN]) if RENAMED_COLUMN in pq.read_schema(path).names \
            else None
        total += 0 if table is None else table.num_rows - table.column(RENAMED_COLUMN).null_count
    return total


def _refuse_clashing_renames(output: Path) -> None:
    """A key made unique (`<key>~<8 hex>`) that another row of the input held as its own key: refused before
    the manifest, so nothing downstream reads two rows under one key. Only a key of that very shape can
    clash, so this runs only where something was renamed."""
    keys = KeyTracker.new()
    for path in finished_shards(output):
        keys.add(pq.read_table(path, columns=["key"]).column("key").to_pylist(), str(path))
    try:
        keys.check()
    except SchemaError as exc:
        raise SchemaError(f"a key made unique by ingest is also another row's own key in the input: {exc}; "
                          f"rename one of them in the input") from exc


def _named(path: str) -> Path:
    """The input's path made absolute, for its name (the pairs' source): `--input .` names the directory,
    where the bare path's name is "", and a symlink keeps the name it was given."""
    return Path(os.path.abspath(path))


def _prepare_source(options: IngestOptions, output: Path) -> tuple[str, IngestConfig, dict, dict]:
    """(input shard dir, config, recorded config, source description) for whichever input was given."""
    staging = output / STAGING
    if options.url_list and options.input:
        raise ValueError(f"{STAGE}: give --input or --url_list, not both")
    if options.input and is_url_list(options.input, options.image_column):
        options.url_list, options.input = options.input, None  # what the Dagster asset passes for a list file
    if options.url_list:
        download = download_config_from(options)
        columns = tuple(c.strip() for c in options.url_list_columns.split(",")) if options.url_list_columns else ()
        listing = ListConfig(str(Path(options.url_list).resolve()), options.url_list_format, options.url_column,
                             options.caption_column, options.key_column, options.list_shard_rows,
                             options.max_caption_chars, options.allow_private_network, options.allow_file_urls,
                             Layout(columns, options.url_list_quoting))
        config = config_from(options, staged=True)
        recorded = {**asdict(config), "url_list": asdict(listing), "download": asdict(download),
                    "source_files": files_fingerprint(list_files(listing.path, listing.format))}
        record = refuse_other_run(output, recorded, options.overwrite)
        stage_missing(output, recorded, lambda: stage_url_list(listing, staging / "list", staging / "fetch", record))
        source = {"kind": "url_list", "format": download.encode_format, "download": download,
                  "shard_rows": listing.shard_rows, "name": _named(options.url_list).stem}
        return str(staging / "list"), config, recorded, source
    if not options.input:
        raise ValueError(f"{STAGE}: --input (or --url_list) and --output are required")
    kind = input_kind(options.input)
    if options.captions_file and kind != "images":
        # A Parquet captions file inside the folder made it read as shards, and the flag was ignored.
        kind = "images" if Path(options.input).is_dir() and not any(Path(options.input).glob("*_stats.json")) \
            else kind
        if kind != "images":
            raise ValueError(f"{STAGE}: --captions_file is for an --input folder of images, and {options.input} "
                             f"is {kind}")
    if kind == "img2dataset":
        config = config_from(options, image_column=check_img2dataset_folder(Path(options.input)))
        return options.input, config, asdict(config), {"kind": kind, "name": _named(options.input).name}
    if kind == "images":
        config = config_from(options, staged=True)
        captions = str(Path(options.captions_file).resolve()) if options.captions_file else None
        images = image_files(Path(options.input), staging / "list")
        sidecars = [p.with_suffix(".txt") for p in images if p.with_suffix(".txt").is_file()]
        files = images + sidecars + ([Path(captions)] if captions else [])
        recorded = {**asdict(config), "image_folder": str(Path(options.input).resolve()), "captions_file": captions,
                    "captions_columns": [options.captions_file_column, options.caption_column],
                    # Staging is cut by it: a resume under another size left images in no shard, or in two.
                    "list_shard_rows": options.list_shard_rows, "source_files": files_fingerprint(files)}
        record = refuse_other_run(output, recorded, options.overwrite)
        stage_missing(output, recorded, lambda: stage_image_folder(
            Path(options.input), staging / "list", captions_file=Path(captions) if captions else None,
            file_column=options.captions_file_column, caption_column=options.caption_column,
            shard_rows=options.list_shard_rows, before_writing=record))
        return str(staging / "list"), config, recorded, {"kind": kind, "name": _named(options.input).name}
    config = config_from(options)
    refuse_unread_parquet(Path(options.input))
    # A row's own `source` text wins; otherwise the directory's name, one value for the whole input.
    return options.input, config, asdict(config), {"kind": kind, "name": Path(options.input).resolve().name}


def _download(source: dict, staging: Path) -> dict:
    """Run img2dataset over the staged list; refuse to go on while some of its shards are unfinished."""
    if torn := drop_torn_shards(staging / "download"):
        print(f"[{STAGE}] img2dataset shard(s) {', '.join(torn)} were cut short by a kill: downloading them again")
    before = download_stats(staging / "download")["download_succeeded"]  # a resumed download's earlier part
    start = time.perf_counter()
    run_img2dataset(staging / "fetch", staging / "download", source["download"], source["shard_rows"])
    seconds = time.perf_counter() - start
    found = downloads_by_list_shard(staging / "download", source["shard_rows"])
    missing = unfinished_shards(staging / "fetch", found)
    if missing:
        raise RuntimeError(f"img2dataset did not finish list shard(s) {missing[:5]} ({len(missing)} in all); "
                           f"rerun the same command to resume the download")
    source["downloads"] = {index: str(path) for index, path in found.items()}
    stats = download_stats(staging / "download")
    stats["download_seconds"] = round(seconds, 3)
    if stats["download_succeeded"] > before and seconds > 0:
        stats["download_images_per_s"] = round((stats["download_succeeded"] - before) / seconds, 2)
    return stats


def _refuse_mixed_download(source: dict, staging: Path, plan) -> None:
    """A resume must dedup against the bytes its finished shards were made from: refuse to fetch them anew.

    Dedup decides over every row, so a resumed run needs every list shard's images; if they are fetched
    again, the web may serve other bytes than the finished shards were deduplicated against."""
    if not (plan.done and plan.todo):
        return
    if source["download"].incremental_mode == "overwrite":
        raise ValueError(f"{STAGE}: {plan.done} shard(s) are finished, and --download_incremental_mode overwrite "
                         f"would download their images again; resume in incremental mode, or start again with "
                         f"--overwrite")
    if any((staging / "fetch").glob("*.parquet")) and not (staging / "download").is_dir():
        raise ValueError(f"{STAGE}: {plan.done} shard(s) are finished, but img2dataset's download they were made "
                         f"from is gone (it is dropped when a run finishes, unless --keep_download); downloading "
                         f"again could give other bytes. Rerun with --overwrite")


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> StageResult:
    refuse_unknown_flags(argv, IngestOptions)
    options = IngestOptions(argv)
    if not options.output:
        raise ValueError(f"{STAGE}: --output is required")
    refuse_overlap(STAGE, options.output, options.input, options.url_list, options.captions_file)
    with output_lock(options.output, STAGE):  # one run at a time writes an output
        return _run(options, test_pipeline)


def _run(options: IngestOptions, test_pipeline: beam.Pipeline | None) -> StageResult:
    output = Path(options.output)
    input_dir, config, recorded, source = _prepare_source(options, output)
    staged = source["kind"] in ("url_list", "images")  # their output was already wiped before staging
    plan = begin_stage(input_dir, output, STAGE, recorded, options.overwrite and not staged,
                       shardwise=False)  # dedup (keys at least) decides over every shard
    if (kept := kept_manifest(plan)) is not None:  # nothing to do: the rejects are not even read again
        _drop_download(source, output, options.keep_download)
        return StageResult(kept, plan.output, up_to_date=True)
    start = time.perf_counter()
    stats: dict = {}
    if source["kind"] == "url_list":
        _refuse_mixed_download(source, output / STAGING, plan)
        if not plan.todo and (output / STAGING / "download").is_dir():  # the shards were all written before
            stats.update(download_stats(output / STAGING / "download"))
    if plan.todo:
        if source["kind"] == "url_list":
            stats.update(_download(source, output / STAGING))
        source.pop("download", None)
        write_pipeline(options, plan, input_dir, config, source, test_pipeline)
    elapsed = time.perf_counter() - start
    rejects = read_table(finished_shards(output / REJECTS_DIR)) if finished_shards(output / REJECTS_DIR) else \
        rejects_table([])
    stats.update(filtered=filter_counts(rejects), duplicates=duplicate_counts(rejects),
                 renamed_keys=_renamed_keys(output))
    if stats["renamed_keys"]:
        _refuse_clashing_renames(output)
    manifest = finish_stage(plan, STAGE, recorded, seconds=round(elapsed, 3), resumed_shards=plan.done, **stats)
    _drop_download(source, output, options.keep_download)
    return StageResult(manifest, plan.output, plan.kept)


def _drop_download(source: dict, output: Path, keep: bool) -> None:
    """img2dataset's download is staging: once the shards are made it goes, unless --keep_download."""
    if source["kind"] == "url_list" and not keep:
        shutil.rmtree(output / STAGING / "download", ignore_errors=True)


def write_pipeline(options: IngestOptions, plan, input_dir: str, config: IngestConfig, source: dict,
                   test_pipeline: beam.Pipeline | None) -> None:
    """Normalise every shard (dedup, keys included, is global), dedup, and write the missing shards."""
    todo = {index for index, _ in plan.todo}
    every = [(index, str(path)) for index, path in enumerate(shard_paths(input_dir))]
    # Every output shard gets the same columns, original_key (set where a key was renamed) among them.
    files = [(path, open_parquet(path)) for _, path in every]
    extras = extras_schema([(path, f.schema_arrow, f.metadata.num_rows) for path, f in files], config,
                           CONTROL_BY_KIND.get(source["kind"], STAGED_COLUMNS),
                           (pa.field(RENAMED_COLUMN, pa.string()),))
    with pipeline_for(options, test_pipeline) as p:
        normalised = (p | ReadShardBatches(every, options.batch_rows)
                      | "Normalise" >> beam.FlatMap(_normalise, config, source))
        # Keys first (made unique), then the content groups (sha256, URL, pHash) over the final keys.
        by_key = (normalised
                  | "Fingerprint" >> beam.FlatMap(_row_prints, config.dedup)
                  | "ByKey" >> beam.GroupByKey())
        decided = by_key | "DecideKeys" >> beam.FlatMap(_decide_key).with_outputs(KEPT_PRINTS, main="verdicts")
        content_losers = (decided[KEPT_PRINTS]
                          | "ByContent" >> beam.GroupByKey()
                          | "ContentLosers" >> beam.FlatMap(_content_losers, config.dedup.near_dup_bits))
        verdicts = ((decided.verdicts, content_losers)
                    | "AllVerdicts" >> beam.Flatten()
                    | "VerdictsToWrite" >> beam.Filter(lambda kv: kv[0] in todo))
        parts = normalised | "PartsToWrite" >> beam.Filter(lambda kv: kv[0] in todo)
        _ = ({"parts": parts, "verdicts": verdicts}
             | "ByShard" >> beam.CoGroupByKey()
             | "Write" >> beam.Map(_write_deduped, str(plan.output), extras))


def demo_flags(workdir: Path) -> list[str]:
    """The demo pool is Parquet shards with image bytes; the defaults (exact dedup on, filters off) fit it."""
    return []


def main(argv: list[str] | None = None) -> None:
    result = run(argv)
    print_summary(result)
    stats = result.manifest["stats"]
    for name in ("duplicates", "filtered"):
        if stats.get(name):
            print(f"[{STAGE}] {name}: {json.dumps(stats[name])}")


if __name__ == "__main__":
    main()
