"""How long a resumed trainer's reader takes to fast-forward to its checkpoint, against reading every row.

A resumed reader must reach the stream position its checkpoint recorded.
It finds from keys alone which row groups it skips whole and reads those
without their images (training.data `_skipped_pieces`); the baseline is
the same reader with that turned off, reading every skipped row's image
bytes as before. The input is synthetic pair shards with incompressible
"image" payloads of a web-typical size in small row groups, so the image
column is most of the bytes, as in production. Both run in this process on
the same files, after a warm-up read (the page cache holds them for both, so
the time saved here is decompression and copying only; the bytes not read
are what a disk or network store would have served). The timed runs of the
two sides alternate, `--repeats` each, and the best of each is kept, so that
neither run order nor load from other processes favours one side. "MB read"
is the decoded Arrow size (`table.nbytes`) of what the reader read, not the
compressed bytes on disk.

    python benchmarks/bench_resume.py [--rows 4000] [--image_kb 48] [--row_group 64] [--at 0.9] [--shuffle_buffer 256]
                                      [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.schema import PAIR_SCHEMA  # noqa: E402
from curation.shards import shard_name  # noqa: E402
import training.data  # noqa: E402
from training.data import ShardStream, StreamSpec  # noqa: E402
from training.shard_set import inspect_shards  # noqa: E402
from training.tokenizer import train_bpe  # noqa: E402


def noise_jpegs(image_kb: int, count: int = 8) -> list[bytes]:
    """JPEGs of random pixels (noise does not compress), cycled over the rows.

    `image_kb` only sets their side, from a rough 1.5 bytes a pixel; the real size differs (about 31 KB
    for 48), so the script reports the bytes it wrote, not `image_kb`.
    """
    rng = np.random.default_rng(0)
    side = int((image_kb * 1024 / 1.5) ** 0.5)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def make_shards(directory: Path, rows: int, image_kb: int, row_group: int, shards: int = 4) -> int:
    """Write the shards; returns the bytes of the JPEGs written, over every row."""
    images = noise_jpegs(image_kb)
    per_shard = rows // shards
    for s in range(shards):
        keys = [f"bench-{s * per_shard + i:08d}" for i in range(per_shard)]
        columns = {"key": keys, "image": [images[i % len(images)] for i in range(per_shard)],
                   "caption": [f"a photo of thing {k}" for k in keys], "width": [64] * per_shard,
                   "height": [64] * per_shard, "sha256": ["0" * 64] * per_shard, "source": ["bench"] * per_shard}
        table = pa.table({f.name: pa.array(columns.get(f.name, [None] * per_shard), f.type) for f in PAIR_SCHEMA},
                         schema=PAIR_SCHEMA)
        pq.write_table(table, directory / shard_name(s), row_group_size=row_group)
    return shards * sum(len(images[i % len(images)]) for i in range(per_shard))


def fast_forward(stream: ShardStream, skip: int) -> tuple[float, int, str]:
    """Seconds and bytes read to the first batch after `skip` stream positions, and its first key (a check)."""
    read, real = [0], training.data.read_unit

    def counted(*args, **kwargs):
        table = real(*args, **kwargs)
        read[0] += table.nbytes
        return table

    training.data.read_unit = counted
    try:
        start = time.perf_counter()
        batch = next(b for b in stream.epoch(0, 1, 0, skip=skip) if "keys" in b)
        return time.perf_counter() - start, read[0], batch["keys"][0]
    finally:
        training.data.read_unit = real


def best_alternated(streams: dict[str, ShardStream], skip: int, repeats: int) -> dict[str, tuple[float, int, str]]:
    """The best of `repeats` fast-forwards per stream, the order swapped every round, so neither goes first always."""
    best: dict[str, tuple[float, int, str]] = {}
    names = list(streams)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            run = fast_forward(streams[name], skip)
            best[name] = min(best.get(name, run), run)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--image_kb", type=int, default=48)
    parser.add_argument("--row_group", type=int, default=64)
    parser.add_argument("--at", type=float, default=0.9, help="resume point, as a share of the epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shuffle_buffer", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternated")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        image_bytes = make_shards(Path(tmp), args.rows, args.image_kb, args.row_group)
        spec = StreamSpec(inspect_shards(tmp), 0, 32, 16, shuffle_buffer=args.shuffle_buffer)
        tokenizer = train_bpe(["a photo of thing bench"] * 20, 300, 16)
        keys_stream, full_stream = (ShardStream(spec, tokenizer, args.batch) for _ in range(2))
        full_stream._skipped_pieces = lambda *a: frozenset()  # the baseline: every skipped row read whole
        skip = int(args.rows * args.at) // args.batch * args.batch
        fast_forward(keys_stream, 0)  # warm-up: the files in the page cache for both
        best = best_alternated({"keys": keys_stream, "full": full_stream}, skip, args.repeats)
    (keys_only, keys_bytes, first), (full, full_bytes, baseline_first) = best["keys"], best["full"]
    assert first == baseline_first, "both must reach the same batch"
    print(f"{args.rows} rows ({image_bytes / 2**20:.0f} MB of JPEGs written, {image_bytes / args.rows / 1024:.1f} KB "
          f"each) in row groups of {args.row_group}; resume at {args.at:.0%} of the epoch (position {skip}); files "
          f"in the page cache; best of {args.repeats} alternated runs a side; MB read = decoded Arrow bytes "
          f"(table.nbytes), not compressed bytes on disk")
    print(f"  full read to the resume point: {full:.3f} s, {full_bytes / 2**20:.1f} MB read")
    print(f"  keys-only skipped row groups:  {keys_only:.3f} s, {keys_bytes / 2**20:.1f} MB read "
          f"({full_bytes / keys_bytes:.1f}x fewer bytes, {full / keys_only:.2f}x the speed)")


if __name__ == "__main__":
    main()
