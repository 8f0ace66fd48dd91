"""Export throughput (MB/s of training shards written) against a plain pyarrow copy of the same data.

The input is synthetic captioned pairs: incompressible "image" payloads of a
web-typical size plus alt-text, rewrites and a fused caption, so the byte mix
is what the export sees in production. The baseline reads each input shard
and writes it back in the export's own file layout (`parquet_bytes`: images
uncompressed, the rest zstd, the same row-group size), with no validation, no
shuffle and no checksums; the export validates every row, shuffles globally,
cuts by bytes, writes row groups and hashes every file, so the ratio is the
cost of those. With --webdataset the export's MB/s counts its tar twin's bytes
too. Both run on the same machine, once warm-up aside.

    python benchmarks/bench_export.py [--rows 2000] [--image_kb 48] [--webdataset]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.export import parquet_bytes
from curation.schema import PAIR_SCHEMA
from curation.shards import shard_name, write_manifest, write_table_atomic
from pipelines import export

ROW_GROUP_MB = 2  # the export's --row_group_mb, and the baseline's row groups


def make_pairs(directory: Path, rows: int, image_kb: int, shards: int) -> int:
    """Captioned pair shards with random image payloads; returns the bytes written."""
    rng = np.random.default_rng(0)
    infos = []
    per_shard = -(-rows // shards)
    for s in range(shards):
        n = min(per_shard, rows - s * per_shard)
        keys = [f"bench-{s * per_shard + i:08d}" for i in range(n)]
        images = [rng.bytes(int(image_kb * 1024 * rng.uniform(0.5, 1.5))) for _ in range(n)]
        captions = [f"a photo of thing number {k} on a table" for k in keys]
        table = pa.table({
            "key": keys, "url": [f"https://example.invalid/{k}.jpg" for k in keys], "caption": captions,
            "image": pa.array(images, pa.binary()), "width": pa.array([256] * n, pa.int32()),
            "height": pa.array([256] * n, pa.int32()), "sha256": ["0" * 64] * n, "source": ["bench"] * n,
            "matched_entries": pa.array([[1, 2, 3]] * n, pa.list_(pa.int32())),
            "keep_prob": pa.array([0.5] * n, pa.float32()),
            "rewrites": [[f"{c}, rewritten {j}" for j in range(4)] for c in captions],
            "synthetic_caption": [f"a detailed synthetic description of {k}" for k in keys],
            "fused_caption": [f"{c}, with a detailed synthetic description" for c in captions],
        }, schema=PAIR_SCHEMA)
        infos.append(write_table_atomic(table, directory / shard_name(s)))
    write_manifest(directory, stage="caption", config={"bench": True}, shards=infos)
    return sum(i.bytes for i in infos)


def plain_copy(source: Path, target: Path) -> tuple[float, int]:
    target.mkdir(parents=True)
    start = time.perf_counter()
    for path in sorted(source.glob("part-*.parquet")):
        (target / path.name).write_bytes(parquet_bytes(pq.read_table(path), ROW_GROUP_MB * 2 ** 20))
    elapsed = time.perf_counter() - start
    return elapsed, sum(p.stat().st_size for p in target.glob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--image_kb", type=int, default=48)
    parser.add_argument("--input_shards", type=int, default=8)
    parser.add_argument("--shard_mb", type=float, default=8.0)
    parser.add_argument("--webdataset", action="store_true", help="Also write the tar twin.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        size = make_pairs(work / "pairs", args.rows, args.image_kb, args.input_shards)
        print(f"input: {args.rows} rows, {size / 1e6:.1f} MB in {args.input_shards} shards")
        plain_copy(work / "pairs", work / "warmup")  # page cache and imports warm for both
        copy_s, copy_bytes = plain_copy(work / "pairs", work / "copy")
        flags = ["--input", str(work / "pairs"), "--output", str(work / "export"), "--shard_mb", str(args.shard_mb),
                 "--allow_small_shards", "--row_group_mb", str(ROW_GROUP_MB)] + (["--webdataset"] if args.webdataset else [])
        start = time.perf_counter()
        result = export.run(flags)
        export_s = time.perf_counter() - start
        written = result.manifest["bytes"] + (result.manifest["webdataset"]["bytes"] if args.webdataset else 0)
        copy_rate = copy_bytes / 1e6 / copy_s
        export_rate = written / 1e6 / export_s
        print(f"plain pyarrow copy (export's file layout): {copy_bytes / 1e6:.1f} MB in {copy_s:.2f}s = "
              f"{copy_rate:.1f} MB/s")
        print(f"export ({len(result.manifest['shards'])} shards{', + webdataset tars' if args.webdataset else ''}): "
              f"{written / 1e6:.1f} MB in {export_s:.2f}s = {export_rate:.1f} MB/s "
              "(includes validation, shuffle, data card, checksums)")
        stats = result.manifest["stats"]
        print(f"  of which: check+plan {stats['check_and_plan_seconds']:.2f}s, shuffle+write "
              f"{stats['write_seconds']:.2f}s, data card and manifest "
              f"{stats['seconds'] - stats['check_and_plan_seconds'] - stats['write_seconds']:.2f}s")
        print(f"ratio export / plain copy: {export_rate / copy_rate:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
