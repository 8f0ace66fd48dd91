"""Rows per second of the whole balance stage vs plain pyarrow reading and writing the same shards.

The baseline is the I/O floor: read each input shard with pyarrow and write it
back (zstd, the stage's row groups), nothing else. The stage does that plus
matching every caption against the default metadata (~290k entries; building
its index is included, once per worker), the pool-wide count, the draw, rejects,
the entry-count table, the plot and the manifest, on Beam's DirectRunner.
The build is timed again afterwards in this process, warm, so it is approximate
(a lower bound); the rate without it is printed for one worker only, since with
`--workers N` each worker builds its own index, in parallel or not.
Rows are synthetic pairs: web-like captions and 8 KB of image bytes each.

    python benchmarks/bench_balance.py [--rows 20000] [--shards 8] [--t 100] [--workers 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from bench_matching import web_captions  # noqa: E402

from curation.matching import Matcher  # noqa: E402
from curation.metadata import default_metadata_path  # noqa: E402
from curation.schema import conform  # noqa: E402
from curation.shards import shard_name, shard_paths, write_table_atomic  # noqa: E402
from pipelines import balance  # noqa: E402


def make_pool(directory: Path, rows: int, shards: int, image_bytes: int) -> None:
    rng = np.random.default_rng(0)
    captions = web_captions(rows, seed=1)
    per_shard = -(-rows // shards)
    for index in range(shards):
        span = range(index * per_shard, min(rows, (index + 1) * per_shard))
        images = [rng.bytes(image_bytes) for _ in span]
        table = pa.table({
            "key": [f"bench-{i:09d}" for i in span],
            "url": [f"https://bench.invalid/{i}.jpg" for i in span],
            "caption": [captions[i] for i in span],
            "image": pa.array(images, pa.binary()),
            "width": pa.array([256] * len(span), pa.int32()),
            "height": pa.array([256] * len(span), pa.int32()),
            "sha256": [hashlib.sha256(b).hexdigest() for b in images],
            "source": ["bench"] * len(span),
        })
        write_table_atomic(conform(table), directory / shard_name(index))


def copy_shards(source: Path, target: Path) -> int:
    rows = 0
    for index, path in enumerate(shard_paths(source)):
        table = pq.read_table(path)
        write_table_atomic(table, target / shard_name(index))
        rows += table.num_rows
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--image_bytes", type=int, default=8192)
    parser.add_argument("--t", type=float, default=100)
    parser.add_argument("--workers", type=int, default=1, help="DirectRunner worker processes for the stage.")
    args = parser.parse_args(argv)

    metadata = default_metadata_path()  # built and cached once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_pool(root / "pool", args.rows, args.shards, args.image_bytes)
        size = sum(p.stat().st_size for p in shard_paths(root / "pool")) / 1e6
        print(f"pool: {args.rows} rows in {args.shards} shards, {size:.0f} MB; metadata {metadata}")

        start = time.perf_counter()
        rows = copy_shards(root / "pool", root / "copy")
        floor_s = time.perf_counter() - start

        flags = ["--input", str(root / "pool"), "--output", str(root / "balanced"), "--metadata", str(metadata),
                 "--t", str(args.t)]
        if args.workers > 1:
            flags += [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
        start = time.perf_counter()
        result = balance.run(flags)
        stage_s = time.perf_counter() - start

    stats = result.manifest["stats"]
    start = time.perf_counter()
    Matcher(json.loads(Path(metadata).read_text()))
    build_s = time.perf_counter() - start
    print(f"balance kept {result.rows} of {stats['rows_in']} rows (t={args.t:g}; {stats['before_head_entries']} head "
          f"entries; rejects {result.rejects})")
    print(f"pyarrow read+write (I/O floor): {rows / floor_s:10.0f} rows/s ({floor_s:.2f}s)")
    print(f"balance stage, {args.workers} worker(s)      : {stats['rows_in'] / stage_s:10.0f} rows/s ({stage_s:.2f}s, "
          f"index build included, once per worker)")
    if args.workers == 1:
        print(f"  of which building the matcher index: ~{build_s:.1f}s (timed warm, after the stage); without it "
              f"~{stats['rows_in'] / max(stage_s - build_s, 1e-9):.0f} rows/s")
    else:
        print(f"  one index build takes ~{build_s:.1f}s (timed warm, after the stage); each of the {args.workers} "
              f"workers builds its own, so no rate without it is given")
    print(f"ratio stage / floor = {floor_s / stage_s:.2f} (the stage runs at this fraction of the I/O floor)")


if __name__ == "__main__":
    main()
