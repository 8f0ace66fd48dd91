"""How reading a manifest grows with its shard count: the ratio of a large one's read to a small one's.

Every stage reads its input's manifest (and its own) several times a run, and
SCALING.md plans outputs of 160,000 shards. The read checks each shard's entry,
the shard names for repeats and the rows' sum; a check that grows faster than
the list (a name search per name took 14 s at 40,000 shards) shows here as a
ratio far above the size ratio. Both reads run in this process on files in the
page cache.

    python benchmarks/bench_manifest.py [--small 4000] [--large 40000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.shards import read_manifest  # noqa: E402


def _write(folder: Path, shards: int) -> None:
    folder.mkdir()
    listed = [{"name": f"part-{i:06d}.parquet", "rows": 100, "bytes": 4096, "sha256": f"{i:064x}"}
              for i in range(shards)]
    (folder / "manifest.json").write_text(json.dumps({
        "schema_version": "1", "stage": "bench", "config": {}, "rows": 100 * shards, "bytes": 4096 * shards,
        "shards": listed, "lineage": []}))


def _best(folder: Path, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        read_manifest(folder)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=4000)
    parser.add_argument("--large", type=int, default=40000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small", Path(tmp) / "large"
        _write(small, args.small)
        _write(large, args.large)
        times = _best(small), _best(large)
    result = {"small_shards": args.small, "large_shards": args.large, "small_s": round(times[0], 4),
              "large_s": round(times[1], 4), "size_ratio": args.large / args.small,
              "time_ratio": round(times[1] / times[0], 1)}
    print(f"read_manifest: {args.small} shards {times[0] * 1000:.1f} ms, {args.large} shards "
          f"{times[1] * 1000:.1f} ms: {result['time_ratio']}x the time for {result['size_ratio']:.0f}x the shards")
    return result


if __name__ == "__main__":
    main()
