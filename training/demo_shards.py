"""Pair-schema shards of the generated demo pool, written without the pipeline: no Beam, no img2dataset.

The trainer's benchmark and its CUDA tests run on machines with torch and
pyarrow but without the pipeline stack, so they cannot run ingest. This
writes what ingest would write for a clean demo pool (generated with no
deliberately broken rows): each row's width and height from its decoded
image, the sha256 of its bytes, source "demo", the stage columns as nulls;
validated against the pair schema, sharded by `curation.shards` with a
manifest. None of ingest's filters, dedup or rejects happen here.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
from PIL import Image

from curation.demo_data import generate
from curation.schema import PAIR_SCHEMA, conform, validate
from curation.shards import ShardWriter, read_table, write_manifest

STAGE = "demo_pairs"


def write_demo_pairs(root: str | Path, pairs: int, *, rows_per_shard: int, row_group_rows: int,
                     seed: int = 0) -> Path:
    """Generate `pairs` demo pairs under `root/demo` and write them as pair shards to `root/demo_pairs`."""
    root = Path(root)
    generate(root / "demo", n_pairs=pairs, n_eval=0, seed=seed, rows_per_shard=rows_per_shard, broken_fraction=0.0)
    pool = read_table(root / "demo" / "pool")
    images = pool.column("image").to_pylist()
    sizes = [Image.open(io.BytesIO(data)).size for data in images]
    table = conform(pa.table({
        "key": pool.column("key"), "url": pool.column("url"), "caption": pool.column("caption"),
        "image": pool.column("image"),
        "width": pa.array([w for w, _ in sizes], pa.int32()), "height": pa.array([h for _, h in sizes], pa.int32()),
        "sha256": pa.array([hashlib.sha256(data).hexdigest() for data in images]),
        "source": pa.array(["demo"] * pool.num_rows),
    }).cast(pa.schema([PAIR_SCHEMA.field(n) for n in ("key", "url", "caption", "image", "width", "height",
                                                        "sha256", "source")])))
    validate(table, file=str(root / "demo" / "pool"))
    out = root / STAGE
    writer = ShardWriter(out, PAIR_SCHEMA, rows_per_shard=rows_per_shard, row_group_rows=row_group_rows, resume=False)
    writer.write(table)
    write_manifest(out, stage=STAGE, config={"pairs": pairs, "seed": seed, "rows_per_shard": rows_per_shard,
                                             "row_group_rows": row_group_rows}, shards=writer.close())
    return out
