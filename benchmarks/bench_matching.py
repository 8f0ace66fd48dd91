"""Captions per second per core: the project's batched matcher vs MetaCLIP's two methods.

(a) naive: `" entry " in spaced_text` for every entry (MetaCLIP's first release);
(b) one pyahocorasick `Automaton.iter` call per caption (MetaCLIP's current code);
project: `curation.matching.Matcher.match_array` on Arrow batches (pyahocorasick over token letters, one
`iter` call per batch).

All three see the same captions and the same metadata (the default one, about
290k entries, built offline and cached). The naive loop takes ~0.1 s per
caption, so it runs on a small subset and its rate is extrapolated per
caption (printed as such). Everything runs in this one process, with Arrow
limited to one thread, so rates are per core. The timed repeats of (b) and the
project alternate, and the best of each is kept, so that load from other
processes on a shared machine weighs on both alike. Captions are web-like: words
drawn from wordfreq's English frequencies (a Zipf law), some capitalised, with
punctuation.

With `--metaclip2_padding` all three use MetaCLIP 2's padding instead (an entry's CJK or punctuation edge
gets no space), and the project matches its open-edged entries with a per-caption automaton loop.

    python benchmarks/bench_matching.py [--captions 20000] [--naive_captions 20] [--batch_rows 8192]
                                        [--metaclip2_padding]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import wordfreq  # noqa: E402

from curation.matching import MATCH_BATCH_ROWS, Matcher, unpadded_key  # noqa: E402
from curation.metadata import default_metadata_path  # noqa: E402
from tests.curation.matching_reference import (  # noqa: E402
    automaton_match, metaclip2_key, metaclip_automaton, naive_match, naive_match_keys,
)


def web_captions(n: int, seed: int) -> list[str]:
    """Alt-text-like captions: 3-20 Zipf-distributed English words, some capitalised, some punctuation."""
    rng = random.Random(seed)
    words = wordfreq.top_n_list("en", 50_000)
    weights = [wordfreq.word_frequency(w, "en") for w in words]
    captions = []
    for _ in range(n):
        chosen = rng.choices(words, weights, k=rng.randint(3, 20))
        chosen = [w.capitalize() if rng.random() < 0.15 else w for w in chosen]
        text = " ".join(chosen)
        captions.append(text + rng.choice(["", "", ".", "!", " - photo", ", 2024"]))
    return captions


def naive(entries: list[str], captions: list[str], metaclip2_padding: bool) -> list[list[int]]:
    """MetaCLIP's loop; with MetaCLIP 2's padding the entries are padded once per run, not once per caption."""
    if metaclip2_padding:
        keys = [metaclip2_key(entry) for entry in entries]
        return [naive_match_keys(keys, caption) for caption in captions]
    return [naive_match(entries, caption) for caption in captions]


def aho_corasick_loop(automaton, captions: list[str]) -> list[list[int]]:
    return [automaton_match(automaton, caption) for caption in captions]


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=20_000)
    parser.add_argument("--naive_captions", type=int, default=20)
    parser.add_argument("--batch_rows", type=int, default=MATCH_BATCH_ROWS,
                        help="Rows per Arrow batch (default: the balance pipeline's matching batch).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats of (b) and the project; best is kept.")
    parser.add_argument("--metaclip2_padding", action="store_true", help="MetaCLIP 2's entry padding, all methods.")
    args = parser.parse_args(argv)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    build_s, path = timed(default_metadata_path)
    entries = json.loads(Path(path).read_text())
    captions = web_captions(args.captions, seed=0)
    print(f"metadata: {len(entries)} entries ({path}; load/build {build_s:.1f}s); {len(captions)} captions, "
          f"{sum(map(len, captions)) / len(captions):.0f} chars on average")

    padding = args.metaclip2_padding
    if padding:
        print(f"MetaCLIP 2 padding: {sum(unpadded_key(e) is not None for e in entries)} entries have an open edge")
    matcher_s, matcher = timed(Matcher, entries, False, padding)
    automaton_s, automaton = timed(metaclip_automaton, entries, padding)
    print(f"build once per worker: project matcher {matcher_s:.1f}s, plain pyahocorasick automaton {automaton_s:.1f}s")

    array = pa.array(captions, pa.string())

    def project() -> list[pa.ListArray]:  # Arrow out, as the pipeline uses it; compared as lists below
        return [matcher.match_array(array.slice(i, args.batch_rows)) for i in range(0, len(array), args.batch_rows)]

    project_runs, loop_runs = [], []
    for _ in range(args.repeats):
        project_runs.append(timed(project))
        loop_runs.append(timed(aho_corasick_loop, automaton, captions))
    project_s, project_batches = min(project_runs, key=lambda r: r[0])
    project_result = [row for batch in project_batches for row in batch.to_pylist()]
    loop_s, loop_result = min(loop_runs, key=lambda r: r[0])
    subset = captions[:args.naive_captions]
    naive_s, naive_result = timed(naive, entries, subset, padding)
    if loop_result != project_result or naive_result != project_result[:len(subset)]:
        raise SystemExit("results differ between methods: the benchmark is void")

    project_rate = len(captions) / project_s
    loop_rate = len(captions) / loop_s
    naive_rate = len(subset) / naive_s
    matches = sum(map(len, project_result)) / len(captions)
    print(f"results identical across the three methods ({matches:.1f} entries matched per caption on average)")
    print(f"(a) naive `entry in text` loop     : {naive_rate:12.1f} captions/s/core "
          f"(measured on {len(subset)} captions, extrapolated per caption)")
    print(f"(b) pyahocorasick, one caption/call: {loop_rate:12.1f} captions/s/core")
    print(f"project, Arrow batches of {args.batch_rows:<5}   : {project_rate:12.1f} captions/s/core")
    print(f"ratio project / (b) = {project_rate / loop_rate:.1f}x   (target >= 3x)")
    print(f"ratio project / (a) = {project_rate / naive_rate:.0f}x   (target >= 1000x)")


if __name__ == "__main__":
    main()
