"""Ingest throughput: images/s through img2dataset against a local server, and what dedup costs per row.

Run from the repository root: `python benchmarks/bench_ingest.py [--urls 400] [--pairs 3000]`.
The baseline for dedup is the same ingest with every dedup criterion off, in the same script.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.demo_data import generate  # noqa: E402
from pipelines import ingest  # noqa: E402
from tests.curation.test_ingest_download import serve_images  # noqa: E402


def timed(argv: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    result = ingest.run(argv)
    return time.perf_counter() - start, result.manifest


def bench_download(work: Path, urls: int, threads: int) -> None:
    with serve_images() as (base, _):
        listing = work / "list.csv"
        listing.write_text("url,caption\n" + "".join(f"{base}/img/{i},thing {i}\n" for i in range(urls)))
        seconds, manifest = timed(["--url_list", str(listing), "--output", str(work / "downloaded"),
                                   "--allow_private_network", "--download_processes", "1",
                                   "--download_threads", str(threads), "--download_image_size", "64"])
    stats = manifest["stats"]
    print(f"download: {urls} URLs, 1 process x {threads} threads: {stats['download_worker_images_per_s']} images/s "
          f"inside the img2dataset worker, {stats['download_images_per_s']} images/s over the whole download call "
          f"({stats['download_seconds']} s incl. process start-up), end to end "
          f"{manifest['rows'] / seconds:.1f} pairs/s ({seconds:.1f} s), success rate {stats['download_success_rate']}")


def bench_dedup(work: Path, pairs: int) -> None:
    generate(work / "demo", n_pairs=pairs, n_eval=0, rows_per_shard=500)
    pool = str(work / "demo" / "pool")
    runs = {
        "no dedup": ["--no_dedup_sha256", "--no_dedup_url"],
        "exact (sha256 + url)": [],
        "exact + pHash (near_dup_bits=4)": ["--near_dup_bits", "4"],
    }
    base = None
    for run, (name, flags) in enumerate(runs.items()):
        best = min(timed(["--input", pool, "--output", str(work / f"out-{run}-{i}"), *flags])[0]
                   for i in range(2))
        base = base if base is not None else best
        print(f"{name:<34} {best:6.2f} s  {best / pairs * 1e6:8.0f} us/row  x{best / base:.2f} of no dedup, "
              f"+{(best - base) / pairs * 1e6:.0f} us/row")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--urls", type=int, default=400)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_download(Path(tmp), args.urls, args.threads)
        bench_dedup(Path(tmp), args.pairs)


if __name__ == "__main__":
    main()
