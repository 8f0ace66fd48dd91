"""Bytes and time to publish a resumed stage output to a remote root, against uploading all of it again.

A resumed output (a stage that grew by new shards, a retry after a failure)
is published again. The remote manifest vouches for the shards it lists,
which were uploaded whole before it, so only the new shards and the small
unlisted files go (assets.resources `StorageResource.publish`); the
baseline is the same publish with nothing vouched for, which is what every
republish did before. The remote is fsspec's in-memory file system, so the
time measured is copying alone: against a bucket the bytes are what costs.
Shards hold incompressible "image" payloads, as a real pool's do.

    python benchmarks/bench_publish.py [--shards 16] [--new 2] [--shard_mb 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsspec  # noqa: E402
import fsspec.implementations.memory  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

import assets.resources  # noqa: E402
from assets.resources import StorageResource  # noqa: E402
from curation.schema import PAIR_SCHEMA  # noqa: E402
from curation.shards import shard_name, write_manifest, write_table_atomic  # noqa: E402

ROWS_PER_SHARD = 64


def _shard(output: Path, index: int, shard_mb: float, rng: np.random.Generator):
    image_bytes = int(shard_mb * 1e6 / ROWS_PER_SHARD)
    rows = [{"key": f"{index}-{i}", "caption": f"caption {i}", "image": rng.bytes(image_bytes), "width": 8,
             "height": 8, "sha256": f"{index * ROWS_PER_SHARD + i:064x}", "source": "bench"}
            for i in range(ROWS_PER_SHARD)]
    return write_table_atomic(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), output / shard_name(index))


def _publish(storage: StorageResource, vouch: bool) -> tuple[int, float]:
    """Publish b1/raw_pairs; returns the bytes uploaded and the seconds taken."""
    uploaded = []
    real_put, real_identities = fsspec.implementations.memory.MemoryFileSystem.put_file, assets.resources._identities

    def counting_put(self, lpath, rpath, **kwargs):
        uploaded.append(Path(lpath).stat().st_size)
        return real_put(self, lpath, rpath, **kwargs)

    fsspec.implementations.memory.MemoryFileSystem.put_file = counting_put
    if not vouch:
        assets.resources._identities = lambda marker, name: {}
    try:
        start = time.perf_counter()
        storage.publish("b1", "raw_pairs")
        return sum(uploaded), time.perf_counter() - start
    finally:
        fsspec.implementations.memory.MemoryFileSystem.put_file = real_put
        assets.resources._identities = real_identities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16, help="shards published before the resume")
    parser.add_argument("--new", type=int, default=2, help="shards the resume adds")
    parser.add_argument("--shard_mb", type=float, default=16.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        made = Path(tmp) / "shards"
        made.mkdir()
        infos = [_shard(made, i, args.shard_mb, rng) for i in range(args.shards + args.new)]
        results = {}
        for vouch in (False, True):  # each side publishes the first run, then the resumed output
            storage = StorageResource(root=f"memory://bench-publish-{vouch}/builds", staging=f"{tmp}/{vouch}")
            output = storage.build_dir("b1") / "raw_pairs"
            output.mkdir()
            for count in (args.shards, args.shards + args.new):
                for info in infos[:count]:
                    if not (output / info.name).exists():
                        os.link(made / info.name, output / info.name)
                write_manifest(output, stage="ingest", config={}, shards=infos[:count])
                results[vouch] = _publish(storage, vouch)
    (base_bytes, base_s), (bytes_, seconds) = results[False], results[True]
    print(f"resumed output: {args.shards} shards published, {args.new} added, {args.shard_mb:g} MB each")
    print(f"{'side':<28}{'MB uploaded':>14}{'seconds':>10}")
    print(f"{'everything again (before)':<28}{base_bytes / 1e6:>14.1f}{base_s:>10.3f}")
    print(f"{'what the manifest lacks':<28}{bytes_ / 1e6:>14.1f}{seconds:>10.3f}")
    print(f"bytes ratio {bytes_ / base_bytes:.3f}, time ratio {seconds / base_s:.3f}")


if __name__ == "__main__":
    main()
