"""MetaCLIP balancing: entry counts over the pool, per-entry probabilities, and a reproducible draw.

1. count[e]: pairs whose caption matched entry e, over the whole pool.
2. p[e] = min(1, t / count[e]): tail entries (count <= t) keep everything.
3. A pair with matched entries E is kept with probability 1 - prod_{e in E}(1 - p[e])
   (MetaCLIP's "any entry selects it"); a pair with no match is dropped.

MetaCLIP draws with unseeded `random.random()`, so every rerun keeps another
subset. Here the single uniform per pair is a hash of (seed, key): the same
seed keeps the same pairs on any runner, worker count or input order, and a
new seed keeps another sample.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.rejects import Reason, reject, rejects_table
from curation.schema import PAIR_FIELDS, conform
from curation.shards import atomic_write_figure

STAGE = "balance"
DEFAULT_T = 20_000
LONG_CAPTION_CHARS = 100_000  # counted in the stats: a web page pasted into an alt attribute, say
CAPTION_COLUMN = "caption"
MATCHES_COLUMN = "matched_entries"
PROB_COLUMN = "keep_prob"


@dataclass(frozen=True)
class BalanceConfig:
    """The one place the stage's settings live (CLI flags and Dagster config both fill it)."""

    metadata: str
    metadata_sha256: str
    t: float = DEFAULT_T
    case_fold: bool = False
    metaclip2_padding: bool = False  # MetaCLIP 2's entry padding (curation.matching): for worldwide metadata
    online_curation: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.t, (int, float)) or not math.isfinite(self.t) or self.t <= 0:
            raise ValueError(f"t must be a positive number of pairs per entry, got {self.t!r}")


def _ids_by_row(matched: pa.ListArray | pa.ChunkedArray) -> tuple[pa.ListArray, np.ndarray, np.ndarray]:
    """The lists as one array, their entry ids flattened, and the row of each id."""
    if isinstance(matched, pa.ChunkedArray):
        matched = matched.combine_chunks() if matched.num_chunks else pa.array([], matched.type)
    ids = pc.list_flatten(matched).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = pc.list_parent_indices(matched).to_numpy(zero_copy_only=False).astype(np.int64)
    return matched, ids, rows


def count_matches(matched: pa.ListArray | pa.ChunkedArray, n_entries: int) -> np.ndarray:
    """uint64 count per entry id: how many captions of `matched` contain it (ids are unique per caption)."""
    _, ids, _ = _ids_by_row(matched)
    return np.bincount(ids, minlength=n_entries).astype(np.uint64)


def expected_matches(matched: pa.ListArray | pa.ChunkedArray, keep_prob: np.ndarray, n_entries: int) -> np.ndarray:
    """float64 per entry id: the sum of the keep probabilities of the captions containing it, i.e. the count
    a draw keeps on average (online curation's "after", whose output holds every matched pair)."""
    _, ids, rows = _ids_by_row(matched)
    return np.bincount(ids, weights=np.asarray(keep_prob, dtype=np.float64)[rows], minlength=n_entries)


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p[e] = t / max(count[e], t): exactly 1 for tail entries and entries never matched."""
    counts = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(counts, t)


def keep_probabilities(matched: pa.ListArray, p: np.ndarray) -> np.ndarray:
    """1 - prod(1 - p[e]) per pair over its matched entries; 0 for a pair with none (or a null list).

    The product is a sum of logs per row, accumulated in a fixed order
    (`np.bincount` over rows in order), so the value is the same on every worker.
    """
    matched, ids, rows = _ids_by_row(matched)
    n = len(matched)
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-p[ids])  # -inf where p == 1
    log_all_miss = np.bincount(rows, weights=log_miss, minlength=n)
    lengths = pc.fill_null(pc.list_value_length(matched), 0).to_numpy(zero_copy_only=False)
    return np.where(lengths > 0, -np.expm1(log_all_miss), 0.0)  # expm1: exact for tiny probabilities


def uniform_draws(keys: list[str], seed: int) -> np.ndarray:
    """One U[0, 1) per key from blake2b(seed, key): independent of order, worker and runner."""
    prefix = f"{seed}\x1f".encode()
    draws = np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "little") for k in keys),
        np.uint64, len(keys))
    return (draws >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _caption_problem(captions: pa.Array) -> np.ndarray:
    """True where a caption is null or blank: it cannot match anything and is rejected as empty."""
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(captions)), 0)
    return pc.fill_null(blank, True).to_numpy(zero_copy_only=False)


def balance_table(table: pa.Table, matched: pa.ListArray, p: np.ndarray, config: BalanceConfig, *,
                  file: str, row_offset: int) -> tuple[pa.Table, pa.Table]:
    """Kept pairs (with `matched_entries` and `keep_prob`) and rejects for one batch.

    Offline (default) keeps a pair when its (seed, key) draw falls under its
    keep probability. Online curation keeps every matched pair and leaves the
    draw to the trainer, which can then apply another t from the saved counts.
    Pairs dropped by the draw are not rejects (that is the balancing), and are
    counted in the stage stats; null or blank captions and captions with no
    entry are rejects.
    """
    keys = table.column("key").to_pylist()
    captions = table.column(CAPTION_COLUMN).combine_chunks()
    prob = keep_probabilities(matched, p)
    empty = _caption_problem(captions)
    no_match = (pc.fill_null(pc.list_value_length(matched), 0).to_numpy(zero_copy_only=False) == 0) & ~empty
    keep = prob > 0
    if not config.online_curation:
        keep &= uniform_draws(keys, config.seed) < prob
    rejected = [reject(keys[i], STAGE, Reason.EMPTY_CAPTION, "caption is null or blank", file, row_offset + i + 1)
                for i in np.flatnonzero(empty)]
    rejected += [reject(keys[i], STAGE, Reason.NO_MATCH, "no metadata entry in caption", file, row_offset + i + 1)
                 for i in np.flatnonzero(no_match)]
    rows = pa.array(np.flatnonzero(keep))
    kept = table.take(rows)
    kept = _set_column(kept, MATCHES_COLUMN, matched.take(rows))
    kept = _set_column(kept, PROB_COLUMN, pa.array(prob[keep].astype(np.float32)))
    return conform(kept), rejects_table(sorted(rejected, key=lambda r: r["row"]))


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    field = PAIR_FIELDS[name]
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), field, values.cast(field.type))
    return table.append_column(field, values.cast(field.type))


def count_summary(counts: np.ndarray, t: float, prefix: str) -> dict[str, float | int]:
    """Head/tail split of a count vector: how many entries and matches sit above and at or below t."""
    counts = np.asarray(counts, dtype=np.int64)
    head = counts > t
    total = int(counts.sum())
    tail_matches = int(counts[~head].sum())
    return {
        f"{prefix}entries_matched": int((counts > 0).sum()),
        f"{prefix}head_entries": int(head.sum()),
        f"{prefix}tail_entries_matched": int(((counts > 0) & ~head).sum()),
        f"{prefix}matches": total,
        f"{prefix}head_matches": total - tail_matches,
        f"{prefix}tail_matches": tail_matches,
        f"{prefix}tail_proportion": round(tail_matches / total, 6) if total else 0.0,
        f"{prefix}max_entry_count": int(counts.max()) if len(counts) else 0,
    }


def entry_count_table(entries: list[str], counts: np.ndarray, kept: np.ndarray, t: float) -> pa.Table:
    """The per-entry data card: id, entry, count in the pool, p at this t, and the count kept."""
    return pa.table({
        "entry_id": pa.array(np.arange(len(entries), dtype=np.int32)),
        "entry": pa.array(entries, pa.string()),
        "count": pa.array(np.asarray(counts, dtype=np.uint64)),
        "p": pa.array(entry_probabilities(counts, t)),
        "kept": pa.array(np.asarray(kept, dtype=np.uint64)),
    })


def plot_entry_counts(counts: np.ndarray, kept: np.ndarray, t: float, path: str,
                      after: str = "after (kept)") -> None:
    """Sorted entry-count curve before and after balancing (log-log), with t marked: the flattened head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for values, label in ((counts, "before (pool)"), (kept, after)):
        ordered = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        ordered = ordered[ordered > 0]
        if len(ordered):
            # ~2000 log-spaced ranks draw the same curve as 500k points, much faster.
            ranks = np.unique(np.geomspace(1, len(ordered), num=min(len(ordered), 2000)).astype(np.int64))
            ax.plot(ranks, ordered[ranks - 1], label=f"{label}: {int(ordered.sum())} matches")
    ax.axhline(t, color="grey", linestyle="--", linewidth=1, label=f"t = {t:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("pairs matching the entry")
    ax.set_title("MetaCLIP balancing: entry counts before and after")
    ax.legend()
    fig.tight_layout()
    atomic_write_figure(fig, path)
    plt.close(fig)
