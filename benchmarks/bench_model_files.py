"""A local model's fingerprint (curation.engines.model_files) against a sha256 of every byte of it.

The rewrite and caption stages fingerprint their local models on every run and
every model load, so that a folder rebuilt in place is not resumed into. The
model here is safetensors-sized random files (a 1B-parameter bf16 model is some
2.5 GB in 1-4 shards); both are timed in this process on the same files after a
warm-up read, so the page cache holds them for both and the time saved is
hashing and reading from memory, not the disk reads a cold model would also cost.

    python benchmarks/bench_model_files.py [--files 2] [--file_mb 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from curation.engines.model_files import model_fingerprint  # noqa: E402
from curation.shards import file_sha256  # noqa: E402


def _best(call, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--file_mb", type=int, default=512)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text('{"hidden_size": 2048}')
        for i in range(args.files):
            (folder / f"model-{i:05d}.safetensors").write_bytes(rng.bytes(args.file_mb << 20))
        files = sorted(folder.iterdir())
        for path in files:  # warm the page cache for both
            path.read_bytes()
        full = _best(lambda: [file_sha256(path) for path in files])
        sampled = _best(lambda: model_fingerprint(str(folder)))
    total_mb = args.files * args.file_mb
    result = {"model_mb": total_mb, "full_sha256_s": round(full, 4), "fingerprint_s": round(sampled, 4),
              "speedup": round(full / sampled, 1)}
    print(f"{total_mb} MB model in {args.files} file(s): sha256 of every byte {full * 1000:.0f} ms, "
          f"sampled fingerprint {sampled * 1000:.1f} ms ({result['speedup']}x less)")
    return result


if __name__ == "__main__":
    main()
