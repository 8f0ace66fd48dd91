"""A stage's manifest turned into the metadata the Dagster UI shows for a materialisation."""

import base64
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from curation.shards import shard_paths

SAMPLE_COLUMNS = ("key", "caption", "rewrites", "synthetic_caption", "fused_caption", "matched_entries", "keep_prob")
SAMPLE_ROWS = 5
MAX_CELL = 80
MAX_EMBEDDED_PNG = 400_000


def rows_in(manifest: dict) -> int:
    """Rows the stage read: what it says, else what it wrote plus what it rejected."""
    stats = manifest.get("stats", {})
    for name in ("rows_in", "input_rows"):
        if isinstance(stats.get(name), int):
            return stats[name]
    return manifest["rows"] + manifest.get("rejects", {}).get("rows", 0)


# Shard paths an event's metadata lists: every one, at 160,000 shards an output (SCALING.md), put some 10 MB
# into each materialisation's event, in the event log's database and the UI.
SHARD_PATHS_SHOWN = 1000


def located(where: str, name: str) -> str:
    """A file of an output at `where`: a local directory, or its published URI (s3://, gs://)."""
    return f"{where.rstrip('/')}/{name}"


def location_metadata(manifest: dict, where: str) -> dict:
    """Where the output and its files are: the local directory until it is published, then the published
    URI, so that the UI never shows a bucket path beside a node-local staging path."""
    shards = manifest["shards"]
    metadata = {"path": dg.MetadataValue.path(where),
                "shard_paths": dg.MetadataValue.json([located(where, s["name"]) for s in shards[:SHARD_PATHS_SHOWN]])}
    if len(shards) > SHARD_PATHS_SHOWN:  # the manifest lists them all; the rest would weigh on the event log
        metadata["shard_paths_not_shown"] = len(shards) - SHARD_PATHS_SHOWN
    if (twin := manifest.get("webdataset")) and twin.get("pattern"):
        metadata["webdataset_pattern"] = located(where, twin["pattern"])
    return metadata


def stage_metadata(manifest: dict, output: Path, where: str) -> dict:
    """Rows in and out, rejects by reason, shards, bytes, duration, throughput, plots and sample rows."""
    stats = manifest.get("stats", {})
    n_in = rows_in(manifest)
    seconds = float(stats.get("seconds") or 0.0)
    metadata: dict = {
        **location_metadata(manifest, where),
        "rows_in": n_in,
        "rows_out": manifest["rows"],
        "rejects_by_reason": dg.MetadataValue.json(manifest.get("rejects", {}).get("by_reason", {})),
        "reject_ratio": manifest.get("rejects", {}).get("rows", 0) / max(n_in, 1),
        "shards": len(manifest["shards"]),
        "bytes": manifest["bytes"],
        "duration_s": seconds,
        "stats": dg.MetadataValue.json({k: v for k, v in stats.items() if k != "plots"}),
    }
    if twin := manifest.get("webdataset"):  # export's tar twin: about as many bytes again, beside the Parquet
        metadata["webdataset_bytes"] = twin["bytes"]
        metadata["webdataset_shards"] = len(twin["shards"])
    if seconds > 0 and not stats.get("resumed_shards"):  # a resumed run's seconds cover only some of the rows
        metadata["rows_per_s"] = round(n_in / seconds, 2)
    for name in stats.get("plots", []):
        plot = output / name
        if plot.is_file():
            metadata[f"plot_{Path(name).stem}"] = plot_markdown(plot)
    sample = sample_table(output)
    if sample:
        metadata["sample_rows"] = dg.MetadataValue.md(sample)
    return metadata


def plot_markdown(path: Path) -> dg.MetadataValue:
    """The PNG embedded in markdown (the UI renders it inline), or its path when it is too big to embed."""
    data = path.read_bytes()
    if len(data) > MAX_EMBEDDED_PNG:
        return dg.MetadataValue.path(str(path))
    encoded = base64.b64encode(data).decode()
    return dg.MetadataValue.md(f"![{path.stem}](data:image/png;base64,{encoded})\n\n`{path}`")


def _cell(value) -> str:
    if isinstance(value, list):
        value = " / ".join(str(v) for v in value)
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def sample_table(output: Path, n: int = SAMPLE_ROWS) -> str:
    """The first rows of the first non-empty shard, text columns only, as a markdown table."""
    for path in shard_paths(output) if output.is_dir() else []:
        parquet = pq.ParquetFile(path)
        columns = [c for c in SAMPLE_COLUMNS if c in parquet.schema_arrow.names]
        if parquet.metadata.num_rows == 0 or not columns:
            continue
        rows = next(parquet.iter_batches(batch_size=n, columns=columns)).to_pylist()
        columns = [c for c in columns if any(row[c] not in (None, []) for row in rows)]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
        return "\n".join(lines)
    return ""
