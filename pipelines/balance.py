"""MetaCLIP balancing as one Beam job: match every caption, count entries over the pool, sample.

Pass 1 (matching) writes, per input shard, the matched entry ids of every row
to `<output>/entry_matches/part-i.parquet` (MetaCLIP's inverted index): a
shard whose file exists is not matched again, so a killed run resumes.
The entry counts are a Beam combine over those files (all of them, every run:
a resumed run counts exactly the pool an uninterrupted one does), and reach
pass 2 as a side input, which Beam computes in full before pass 2 starts.
Pass 2 reads the input shards still to do, computes each pair's keep
probability and keeps it when the (seed, key) draw falls under it.

Beside the output: `entry_counts.parquet` (entry, count, p, kept: with
`--online_curation`, whose output keeps every pair, a new t can be applied
from it and `matched_entries` without matching again; `entry_matches/` holds
every pool row's matches either way) and
`entry_counts.png` (the sorted count curve before and after).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.balancing import (
    CAPTION_COLUMN, DEFAULT_T, LONG_CAPTION_CHARS, MATCHES_COLUMN, PROB_COLUMN, STAGE, BalanceConfig, balance_table,
    count_matches, count_summary, entry_count_table, entry_probabilities, expected_matches, plot_entry_counts,
)
from curation.input_check import InputCheck, is_text
from curation.matching import MATCH_BATCH_ROWS, MATCHES_TYPE, matcher_for
from curation.metadata import DEFAULT, MetadataFile, resolve_metadata
from curation.output_lock import output_lock
from curation.shards import (
    file_identity, finished_shards, shard_name, shard_paths, write_table_atomic,
)
from pipelines.common import (
    REJECTS_DIR, ReadShardBatches, ShardStageOptions, WriteShards, begin_stage, finish_stage, kept_manifest,
    refuse_overlap,
)
from pipelines.runner import StageResult, pipeline_for, print_summary, refuse_unknown_flags

INPUT_CHECK = InputCheck(STAGE, "pair shards (run ingest first)", {CAPTION_COLUMN: is_text})
MATCHES_DIR = "entry_matches"
COUNTS_FILE = "entry_counts.parquet"
PLOT_FILE = "entry_counts.png"
MATCH_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field(MATCHES_COLUMN, MATCHES_TYPE),
    pa.field("caption_chars", pa.int64()),
])


class BalanceOptions(ShardStageOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--metadata", default=DEFAULT,
                            help="MetaCLIP metadata.json (a JSON list of strings), or 'default' to build one "
                                 "offline from WordNet and wordfreq (cached).")
        parser.add_argument("--t", type=float, default=DEFAULT_T,
                            help="Pairs kept per head entry in expectation (MetaCLIP: 20000 for a 1.6B pool).")
        parser.add_argument("--case_fold", action="store_true",
                            help="Match case-insensitively (MetaCLIP matches case-sensitively).")
        parser.add_argument("--metaclip2_padding", action="store_true",
                            help="MetaCLIP 2's padding: no space required beside an entry's CJK, Thai, Lao, "
                                 "Burmese, Khmer, Tibetan or punctuation edge, so entries match in text written "
                                 "without spaces (MetaCLIP 1 pads every entry).")
        parser.add_argument("--online_curation", action="store_true",
                            help="Keep every matched pair with its keep_prob and let the trainer draw.")


class MatchCaptions(beam.DoFn):
    """(shard, (offset, key/matches/caption length table)) per batch; the matcher is built once per worker."""

    def __init__(self, metadata: str, sha256: str, case_fold: bool, metaclip2_padding: bool):
        self.metadata, self.sha256, self.case_fold, self.metaclip2_padding = metadata, sha256, case_fold, \
            metaclip2_padding
        self._matcher = None

    def setup(self) -> None:
        self._matcher = matcher_for(self.metadata, self.sha256, self.case_fold, self.metaclip2_padding)

    def process(self, item):
        index, (path, offset, batch) = item
        captions = batch.column(CAPTION_COLUMN)
        table = pa.table({"key": batch.column("key"), MATCHES_COLUMN: self._matcher.match_array(captions),
                          "caption_chars": pc.utf8_length(captions).cast(pa.int64())}, schema=MATCH_SCHEMA)
        yield index, (offset, table)


def _write_matches(group, output: str, n_entries: int) -> np.ndarray:
    """Write one shard's matches in row order (atomically) and return its entry counts."""
    index, parts = group
    table = pa.concat_tables([table for _, table in sorted(parts, key=lambda part: part[0])])
    write_table_atomic(table, Path(output) / MATCHES_DIR / shard_name(index))
    return count_matches(table.column(MATCHES_COLUMN), n_entries)


def _counts_of(path: str, n_entries: int) -> np.ndarray:
    return count_matches(pq.read_table(path, columns=[MATCHES_COLUMN]).column(MATCHES_COLUMN), n_entries)


class SumCounts(beam.CombineFn):
    """Element-wise sum of uint64 count vectors: the pool-wide entry counts."""

    def __init__(self, n_entries: int):
        self.n_entries = n_entries

    def create_accumulator(self) -> np.ndarray:
        return np.zeros(self.n_entries, np.uint64)

    def add_input(self, accumulator: np.ndarray, counts: np.ndarray) -> np.ndarray:
        accumulator += counts
        return accumulator

    def merge_accumulators(self, accumulators) -> np.ndarray:
        total = np.zeros(self.n_entries, np.uint64)
        for accumulator in accumulators:
            total += accumulator
        return total

    def extract_output(self, accumulator: np.ndarray) -> np.ndarray:
        return accumulator


def _write_counts(counts: np.ndarray, output: str) -> None:
    """The pool counts as they leave the combine; `summarise` adds entry names, p and the kept counts."""
    table = pa.table({"entry_id": pa.array(np.arange(len(counts), dtype=np.int32)), "count": pa.array(counts)})
    write_table_atomic(table, Path(output) / COUNTS_FILE)


_SIDECAR: dict[tuple, pa.Table] = {}


def _matches_for(output: str, index: int) -> pa.Table:
    """The shard's matches, read once per worker while its batches stream through (they arrive together).

    Keyed by the file's identity, not just its path, so a rewritten file (an
    --overwrite run in the same process) is never served stale.
    """
    path = Path(output) / MATCHES_DIR / shard_name(index)
    key = file_identity(path)
    if key not in _SIDECAR:
        _SIDECAR.clear()
        _SIDECAR[key] = pq.read_table(path, schema=MATCH_SCHEMA)
    return _SIDECAR[key]


class SampleBatch(beam.DoFn):
    """Pairs kept by the balancing draw and rejects, per batch, with the pool counts as a side input."""

    def __init__(self, output: str, config: BalanceConfig):
        self.output, self.config = output, config
        self._p = None

    def process(self, item, counts: np.ndarray):
        if self._p is None:
            self._p = entry_probabilities(counts, self.config.t)
        index, (path, offset, batch) = item
        table = pa.Table.from_batches([batch])
        matches = _matches_for(self.output, index).slice(offset, batch.num_rows)
        keys = table.column("key").cast(pa.string())  # matches hold keys as string; an input may be large_string
        if matches.num_rows != table.num_rows or not matches.column("key").equals(keys):
            raise RuntimeError(f"{path}: rows {offset + 1}..{offset + table.num_rows} differ from "
                               f"{self.output}/{MATCHES_DIR}/{shard_name(index)}; the input changed since "
                               f"matching (rerun with --overwrite)")
        pairs, rejects = balance_table(table, matches.column(MATCHES_COLUMN).combine_chunks(), self._p, self.config,
                                       file=path, row_offset=offset)
        yield index, ("pairs", pairs)
        if rejects.num_rows:
            yield index, ("rejects", rejects)


def config_from(options: BalanceOptions) -> tuple[BalanceConfig, MetadataFile]:
    """Validate t and the metadata (empty file, blank entry) before anything is read or written."""
    if options.t is None or options.t <= 0:
        raise ValueError(f"--t must be positive, got {options.t}")
    metadata = resolve_metadata(options.metadata)
    # Resolved: remote workers open it, from another working directory.
    config = BalanceConfig(str(Path(metadata.path).resolve()), metadata.sha256, options.t, options.case_fold,
                           options.metaclip2_padding, options.online_curation, options.seed)
    return config, metadata


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> StageResult:
    refuse_unknown_flags(argv, BalanceOptions)
    options = BalanceOptions(argv)
    config, metadata = config_from(options)
    if not options.input or not options.output:
        raise ValueError(f"{STAGE}: --input and --output are required")
    refuse_overlap(STAGE, options.output, options.input, metadata.path)
    with output_lock(options.output, STAGE):  # one run at a time writes an output
        return _run(options, config, metadata, test_pipeline)


def _run(options: BalanceOptions, config: BalanceConfig, metadata: MetadataFile,
         test_pipeline: beam.Pipeline | None) -> StageResult:
    n_entries = len(metadata.entries)
    inputs = shard_paths(options.input)
    # Every pair's draw hashes its key: two rows of one key would be kept or dropped together.
    plan = begin_stage(options.input, options.output, STAGE, asdict(config), options.overwrite,
                       shardwise=False, check=INPUT_CHECK)  # counts over the whole pool
    if (kept := kept_manifest(plan)) is not None:  # nothing to do: not even the counts and plot are rewritten
        return StageResult(kept, plan.output, up_to_date=True)
    output = str(plan.output)
    start = time.perf_counter()
    if not plan.up_to_date:
        matched = {p.name for p in finished_shards(plan.output / MATCHES_DIR)}
        to_match = [(i, str(p)) for i, p in enumerate(inputs) if shard_name(i) not in matched]
        already = [str(plan.output / MATCHES_DIR / shard_name(i)) for i in range(len(inputs))
                   if shard_name(i) in matched]
        with pipeline_for(options, test_pipeline) as p:
            new_counts = (p
                          | "ReadCaptions" >> ReadShardBatches(to_match, MATCH_BATCH_ROWS, ["key", CAPTION_COLUMN])
                          | "Match" >> beam.ParDo(MatchCaptions(config.metadata, config.metadata_sha256,
                                                                config.case_fold, config.metaclip2_padding))
                          | "ByShard" >> beam.GroupByKey()
                          | "WriteMatches" >> beam.Map(_write_matches, output, n_entries))
            old_counts = (p
                          | "MatchedBefore" >> beam.Create(already)
                          | "CountBefore" >> beam.Map(_counts_of, n_entries))
            counts = ((new_counts, old_counts)
                      | "AllShards" >> beam.Flatten()
                      | "PoolCounts" >> beam.CombineGlobally(SumCounts(n_entries)))
            _ = counts | "WriteCounts" >> beam.Map(_write_counts, output)
            _ = (p
                 | "ReadPairs" >> ReadShardBatches(plan.todo, options.batch_rows)
                 | "Sample" >> beam.ParDo(SampleBatch(output, config), counts=beam.pvalue.AsSingleton(counts))
                 | WriteShards(plan.output))
    elapsed = time.perf_counter() - start
    stats = summarise(plan.output, config, metadata.entries)
    # A resumed run did only part of the pool: a rate of the whole pool over its seconds would be inflated.
    rate = round(stats["rows_in"] / elapsed, 1) if elapsed and not plan.done else None
    stats.update(seconds=round(elapsed, 3), rows_per_second=rate, resumed_shards=plan.done)
    manifest = finish_stage(plan, STAGE, asdict(config), **stats)
    return StageResult(manifest, plan.output, plan.kept)


def summarise(output: Path, config: BalanceConfig, entries: list[str]) -> dict:
    """Stats from the files on disk, so a resumed run reports what an uninterrupted one would.

    Also adds the kept count per entry to `entry_counts.parquet` and draws the plot.
    """
    n_entries = len(entries)
    # A shard at a time: one column of the whole pool in the driver is 8 bytes a row, 3 GB at 400M pairs.
    rows_in = long_captions = 0
    for path in finished_shards(output / MATCHES_DIR):
        chars = pq.read_table(path, columns=["caption_chars"]).column("caption_chars")
        rows_in += len(chars)
        long_captions += int(pc.sum(pc.greater(chars, LONG_CAPTION_CHARS)).as_py() or 0)
    out_paths = finished_shards(output)
    # Online, the output holds every matched pair: its "after" is what a draw keeps on average, else the
    # kept counts, figures and plot showed the unbalanced pool.
    kept = np.zeros(n_entries, np.float64)
    columns = [MATCHES_COLUMN, PROB_COLUMN] if config.online_curation else [MATCHES_COLUMN]
    for path in out_paths:
        shard = pq.read_table(path, columns=columns)
        kept += (expected_matches(shard.column(MATCHES_COLUMN), shard.column(PROB_COLUMN).to_numpy(), n_entries)
                 if config.online_curation else count_matches(shard.column(MATCHES_COLUMN), n_entries))
    kept = np.rint(kept).astype(np.uint64)
    counts = pq.read_table(output / COUNTS_FILE, columns=["count"]).column("count").to_numpy()
    table = entry_count_table(entries, counts, kept, config.t)
    write_table_atomic(table, output / COUNTS_FILE)
    plot_entry_counts(counts, kept, config.t, str(output / PLOT_FILE),
                      after="after (expected, online)" if config.online_curation else "after (kept)")
    rows_out = sum(pq.ParquetFile(p).metadata.num_rows for p in out_paths)
    rejected = sum(pq.ParquetFile(p).metadata.num_rows for p in finished_shards(output / REJECTS_DIR))
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_rejected": rejected,
        "rows_dropped_by_sampling": rows_in - rows_out - rejected,
        "long_captions": long_captions,
        "t": config.t,
        "metadata_entries": n_entries,
        **count_summary(counts, config.t, "before_"),
        **count_summary(kept, config.t, "after_"),
        **({"after_is_expected": True} if config.online_curation else {}),
        "entry_counts": COUNTS_FILE,
        "plots": [PLOT_FILE],
    }


def demo_flags(workdir: Path) -> list[str]:
    """The demo's own metadata (written by the generator) and a t small enough to flatten its head."""
    return ["--metadata", str(Path(workdir) / "demo" / "metadata.json"), "--t", "20"]


def main(argv: list[str] | None = None) -> None:
    print_summary(run(argv))


if __name__ == "__main__":
    main()
