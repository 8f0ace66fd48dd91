"""The `raw_pairs` asset: ingest as the first step of a dataset build, with its checks beside it."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.resources import BeamRunnerResource, StorageResource
from curation.demo_data import generate
from curation.schema import SchemaError
from curation.shards import iter_batches, read_manifest
from pipelines import ingest

DEMO_SOURCE = "demo"


class IngestRunConfig(dg.Config):
    source: str = Field(default=DEMO_SOURCE,
                        description="Directory of raw Parquet shards (caption and image bytes), or 'demo'.")
    build: str = Field(default="default", description="Name of the dataset build; its outputs live under storage.root/build.")
    demo_pairs: int = Field(default=3000, description="Pairs generated when source is 'demo'.")
    max_reject_ratio: float = Field(default=0.2, description="The reject-ratio check fails above this share.")


def _source_dir(config: IngestRunConfig, build_dir: Path) -> Path:
    if config.source != DEMO_SOURCE:
        return Path(config.source)
    demo = build_dir / "demo"
    if not (demo / "classes.json").is_file():
        generate(demo, n_pairs=config.demo_pairs)
    return demo / "pool"


@dg.asset(group_name="curation", description="Canonical pair shards from the raw source, with a rejects table.")
def raw_pairs(context: dg.AssetExecutionContext, config: IngestRunConfig, storage: StorageResource,
              beam_runner: BeamRunnerResource) -> dg.MaterializeResult:
    build_dir = storage.build_dir(config.build)
    output = build_dir / "raw_pairs"
    result = ingest.run(["--input", str(_source_dir(config, build_dir)), "--output", str(output), *beam_runner.flags()])
    manifest = result.manifest
    rows_in = manifest["rows"] + manifest["rejects"]["rows"]
    context.log.info(f"ingest wrote {manifest['rows']} rows to {output}")
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(output)),
        "rows_in": rows_in,
        "rows_out": manifest["rows"],
        "rejects_by_reason": dg.MetadataValue.json(manifest["rejects"]["by_reason"]),
        "reject_ratio": manifest["rejects"]["rows"] / max(rows_in, 1),
        "shards": len(manifest["shards"]),
        "bytes": manifest["bytes"],
        "seconds": manifest["stats"]["seconds"],
    })


def _output_dir(storage: StorageResource, build: str) -> Path:
    return storage.build_dir(build) / "raw_pairs"


@dg.asset_check(asset=raw_pairs, blocking=True, description="Every shard matches the pair schema and no key repeats.")
def raw_pairs_schema_valid(storage: StorageResource) -> dg.AssetCheckResult:
    output = _output_dir(storage, "default")
    try:
        rows = sum(batch.num_rows for _, batch in iter_batches(output))
    except SchemaError as exc:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(exc)})
    return dg.AssetCheckResult(passed=True, metadata={"rows": rows})


@dg.asset_check(asset=raw_pairs, blocking=True, description="The share of rejected rows stays under the threshold.")
def raw_pairs_reject_ratio(storage: StorageResource) -> dg.AssetCheckResult:
    manifest = read_manifest(_output_dir(storage, "default"))
    rejected = manifest["rejects"]["rows"]
    ratio = rejected / max(rejected + manifest["rows"], 1)
    return dg.AssetCheckResult(passed=ratio <= IngestRunConfig().max_reject_ratio, metadata={"reject_ratio": ratio})
