"""An up-to-date stage rerun against the same rerun hashing its whole input first, as it did before.

A finished output's rerun checks the input's sizes and hashes every byte only
once there is work (pipelines.common.begin_stage). The input here is pair
shards with incompressible "image" payloads, so the bytes are what a real
pool's are; both runs are in this process on the same files after a warm-up
read (the page cache holds them for both, so the time saved is hashing alone,
not the disk or network reads a real pool would also have cost).

    python benchmarks/bench_rerun.py [--shards 16] [--shard_mb 64]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from curation.schema import PAIR_SCHEMA  # noqa: E402
from curation.shards import shard_name, verify_manifest, write_manifest, write_table_atomic  # noqa: E402
from pipelines.common import begin_stage, finish_stage  # noqa: E402

IMAGE_KB = 64


def make_pool(directory: Path, shards: int, shard_mb: int) -> None:
    rng = np.random.default_rng(0)
    rows = shard_mb * 1024 // IMAGE_KB
    infos = []
    for s in range(shards):
        keys = [f"k{s}-{i}" for i in range(rows)]
        table = pa.Table.from_pylist([{"key": key, "caption": "a photo", "image": rng.bytes(IMAGE_KB * 1024),
                                       "width": 8, "height": 8, "sha256": f"{i:064x}", "source": "bench"}
                                      for i, key in enumerate(keys)], schema=PAIR_SCHEMA)
        infos.append(write_table_atomic(table, directory / shard_name(s)))
    write_manifest(directory, stage="bench", config={}, shards=infos)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--shard_mb", type=int, default=64)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    try:
        pool, output = root / "pool", root / "out"
        pool.mkdir()
        make_pool(pool, args.shards, args.shard_mb)
        plan = begin_stage(pool, output, "bench", {})
        for i, path in plan.todo:  # a finished output: each input shard's output written
            shutil.copyfile(path, output / shard_name(i))
        finish_stage(plan, "bench", {})
        verify_manifest(pool)  # warm-up: the page cache holds the pool for both runs

        start = time.perf_counter()
        assert begin_stage(pool, output, "bench", {}).up_to_date
        now = time.perf_counter() - start
        start = time.perf_counter()
        verify_manifest(pool)  # the baseline: what every rerun did first
        assert begin_stage(pool, output, "bench", {}).up_to_date
        before = time.perf_counter() - start
        size_mb = args.shards * args.shard_mb
        print(f"pool: {args.shards} shards, {size_mb} MB")
        print(f"up-to-date rerun: {now * 1000:.1f} ms now, {before * 1000:.1f} ms hashing the input first "
              f"({before / now:.0f}x; {size_mb / before:.0f} MB/s of hashing saved)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
