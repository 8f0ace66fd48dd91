"""Ingest as a Beam job: raw Parquet rows (image bytes + alt-text) to canonical pair shards plus rejects."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import apache_beam as beam

from curation.ingest import STAGE, IngestConfig, normalise_batch
from pipelines.common import ReadShardBatches, ShardStageOptions, WriteShards, begin_stage, finish_stage
from pipelines.runner import StageResult, pipeline_for, print_summary


class IngestOptions(ShardStageOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        defaults = IngestConfig()
        parser.add_argument("--key_column", default=defaults.key_column)
        parser.add_argument("--url_column", default=defaults.url_column)
        parser.add_argument("--caption_column", default=defaults.caption_column)
        parser.add_argument("--image_column", default=defaults.image_column)
        parser.add_argument("--max_caption_chars", type=int, default=defaults.max_caption_chars)


def _normalise(item, config: IngestConfig):
    index, (path, offset, batch) = item
    source = Path(path).stem
    pairs, rejects = normalise_batch(batch, config, source=source, file=path, row_offset=offset)
    yield index, ("pairs", pairs)
    if rejects.num_rows:
        yield index, ("rejects", rejects)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> StageResult:
    options = IngestOptions(argv)
    config = IngestConfig(options.key_column, options.url_column, options.caption_column, options.image_column,
                          options.max_caption_chars)
    plan = begin_stage(options.input, options.output, STAGE, asdict(config), options.overwrite)
    start = time.perf_counter()
    if plan.todo:
        with pipeline_for(options, test_pipeline) as p:
            _ = (p
                 | ReadShardBatches(plan.todo, options.batch_rows)
                 | "Normalise" >> beam.FlatMap(_normalise, config)
                 | WriteShards(plan.output))
    elapsed = time.perf_counter() - start
    manifest = finish_stage(plan, STAGE, asdict(config), seconds=round(elapsed, 3), resumed_shards=plan.done)
    return StageResult(manifest, plan.output)


def main(argv: list[str] | None = None) -> None:
    print_summary(run(argv))


if __name__ == "__main__":
    main()
