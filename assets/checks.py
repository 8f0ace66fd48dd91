"""The data-quality gates of a build, evaluated by each asset right after it materialises.

They are `AssetCheckSpec`s declared on the assets (so they appear on the
asset graph and in the UI) and evaluated inside the asset's step: a check
sees exactly the partition just written. The blocking ones stop every
downstream asset of the run when they fail.
"""

import collections
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.schema import KeyTracker, SchemaError
from curation.shards import ManifestError, finished_shards, iter_batches, open_parquet, shard_paths, verify_manifest

SCHEMA_VALID = "schema_valid"
CHECKSUMS_MATCH = "manifest_checksums_match"
REJECT_RATIO = "reject_ratio_under_threshold"
BALANCED = "entries_kept_as_expected"
REWRITES = "valid_rewrite_share"
CAPTIONS = "synthetic_caption_share"
ROWS_CONSERVED = "every_input_row_exported"


def specs(asset: str, *extra: tuple[str, str, bool], rejects: bool = True) -> list[dg.AssetCheckSpec]:
    """The checks every stage output gets, plus the stage's own (name, description, blocking).

    A stage that refuses bad input rather than rejecting rows (export) gets no reject-ratio check: it could
    not fail there.
    """
    common = [
        (SCHEMA_VALID, "Every shard matches the pair schema and no key repeats.", True),
        (CHECKSUMS_MATCH, "The manifest's sizes and sha256 match the files.", True),
    ]
    if rejects:
        common.append((REJECT_RATIO, "The share of rejected input rows stays under the QualityGatesResource limit.",
                       True))
    return [dg.AssetCheckSpec(name, asset=asset, description=description, blocking=blocking)
            for name, description, blocking in [*common, *extra]]


def _training_rows(output: Path) -> int:
    """Training shards hold the training columns only: check those, their types, and key uniqueness."""
    from curation.export import validate_training_table
    keys, rows = KeyTracker.new(), 0
    for path in shard_paths(output):
        parquet = open_parquet(path)
        validate_training_table(parquet.schema_arrow, file=str(path))
        offset = 0
        for batch in parquet.iter_batches(columns=["key"]):
            keys.add(batch.column(0).to_pylist(), str(path), offset)
            offset += batch.num_rows
        rows += offset
    keys.check()
    return rows


def schema_valid(asset: str, output: Path, training: bool = False) -> dg.AssetCheckResult:
    """The pair schema (or, for training shards, the training columns) holds and no key repeats."""
    try:
        rows = _training_rows(output) if training else sum(batch.num_rows for _, batch in iter_batches(output))
    except (SchemaError, OSError, pa.ArrowException) as exc:  # a wrong column, a missing or unreadable shard
        return dg.AssetCheckResult(asset_key=asset, check_name=SCHEMA_VALID, passed=False, metadata={"error": str(exc)})
    return dg.AssetCheckResult(asset_key=asset, check_name=SCHEMA_VALID, passed=True, metadata={"rows": rows})


def checksums_match(asset: str, output: Path, export: bool = False) -> dg.AssetCheckResult:
    """The manifest's sizes and sha256 against the files; an export's WebDataset tars too."""
    from curation.export import verify_export
    try:
        manifest = verify_export(output) if export else verify_manifest(output)
    except ManifestError as exc:
        return dg.AssetCheckResult(asset_key=asset, check_name=CHECKSUMS_MATCH, passed=False,
                                   metadata={"error": str(exc)})
    return dg.AssetCheckResult(asset_key=asset, check_name=CHECKSUMS_MATCH, passed=True,
                               metadata={"files": len(manifest["shards"])})


def _tar_samples(path: Path) -> int:
    """Samples as webdataset reads a tar: its members grouped by the name before the first dot."""
    with tarfile.open(path) as tar:  # iterating reads the headers and seeks past the data
        return len({member.name.split(".", 1)[0] for member in tar})


def rows_conserved(asset: str, output: Path, manifest: dict, input_rows: int) -> dg.AssetCheckResult:
    """Export keeps every row: its Parquet files (by their footers) and tar twins (by the samples webdataset
    would read from them, which two rows sharing a member stem would merge) hold the upstream's rows, shard
    by shard."""
    twin = manifest.get("webdataset")
    try:
        parquet = [pq.ParquetFile(output / shard["name"]).metadata.num_rows for shard in manifest["shards"]]
        tars = [_tar_samples(output / twin["directory"] / shard["name"]) for shard in twin["shards"]] if twin else None
    except (OSError, pa.ArrowException, tarfile.TarError) as exc:  # missing or unreadable: fail, do not raise
        return dg.AssetCheckResult(asset_key=asset, check_name=ROWS_CONSERVED, passed=False,
                                   metadata={"error": str(exc)})
    uneven = [twin["shards"][i]["name"] for i, n in enumerate(tars or []) if i >= len(parquet) or n != parquet[i]]
    passed = sum(parquet) == input_rows and (tars is None or (len(tars) == len(parquet) and not uneven))
    metadata = {"input_rows": input_rows, "parquet_rows": sum(parquet),
                **({"webdataset_samples": sum(tars), "shards_whose_tar_differs": dg.MetadataValue.json(uneven)}
                   if tars is not None else {})}
    return dg.AssetCheckResult(asset_key=asset, check_name=ROWS_CONSERVED, passed=passed, metadata=metadata)


def reject_ratio(asset: str, ratio: float, threshold: float,
                 download: Optional[tuple[float, float]] = None) -> dg.AssetCheckResult:
    """The share of its input a stage rejected, against its limit. For ingest, `ratio` counts the rows that
    downloaded and `download` is the dead links' share of the list with its own, looser limit: web lists
    lose a third of their links within a few years, which says nothing of the rows that remain, and one
    limit for both failed an ordinary crawl."""
    metadata = {"reject_ratio": round(ratio, 4), "threshold": threshold}
    passed = ratio <= threshold
    if download is not None:
        metadata |= {"download_failure_ratio": round(download[0], 4), "download_failure_threshold": download[1]}
        passed = passed and download[0] <= download[1]
    return dg.AssetCheckResult(asset_key=asset, check_name=REJECT_RATIO, passed=passed, metadata=metadata)


def judged(asset: str, check_name: str, judge: Callable[[], dg.AssetCheckResult]) -> dg.AssetCheckResult:
    """A check that reads the shards fails on one it cannot read, as schema_valid does. Raised instead, it
    ended the step with no result and no failure recorded (assets.build_records), so the output's earlier
    passing evaluation stood in the UI and a downstream run built on it."""
    try:
        return judge()
    except (OSError, pa.ArrowException) as exc:
        return dg.AssetCheckResult(asset_key=asset, check_name=check_name, passed=False,
                                   metadata={"error": f"a shard cannot be read: {exc}"})


def _column_values(output: Path, column: str):
    for path in shard_paths(output):
        parquet = pq.ParquetFile(path)
        if column not in parquet.schema_arrow.names:
            continue
        for batch in parquet.iter_batches(columns=[column]):
            yield from batch.column(0).to_pylist()


def balance_tally(output: Path, p: np.ndarray,
                  online: bool) -> tuple[np.ndarray, np.ndarray, collections.Counter, dict]:
    """One read of each output shard and of its pool rows' matches (`entry_matches/part-i` beside shard i):

    - per entry, the mean and variance of how many pairs balancing keeps: a pair matching entries E is kept
      with probability q = 1 - prod(1 - min(1, t/count_e)) (every matched pair, q = 1, under online
      curation), and it counts for each entry in E once;
    - per entry, how many pairs it kept;
    - each kept row against its pool row: the same entries, the keep_prob they give, and (online curation,
      which keeps every matched pair) none missing; and the kept total against the sum of the pool's keep
      probabilities, the offline draw's mean. Counted per entry alone, rows whose `matched_entries` were
      lost counted for nothing, and the trainer's `keep_prob` was never read: a balance that kept all (or
      half) of an online pool at 1.0 passed.
    """
    from curation.balancing import keep_probabilities
    from pipelines.balance import MATCHES_COLUMN, MATCHES_DIR

    mean, var, kept = np.zeros(len(p)), np.zeros(len(p)), collections.Counter()
    found = collections.Counter(kept=0, expected=0.0, variance=0.0)
    for matches, shard in zip(finished_shards(output / MATCHES_DIR), shard_paths(output)):
        pool = pq.read_table(matches, columns=["key", MATCHES_COLUMN])
        matched = pool.column(MATCHES_COLUMN).combine_chunks()
        q = keep_probabilities(matched, p)
        drawn = np.ones(len(matched)) if online else q
        rows = pc.list_parent_indices(matched).to_numpy(zero_copy_only=False).astype(np.int64)
        ids = pc.list_flatten(matched).to_numpy(zero_copy_only=False).astype(np.int64)
        pairs = np.unique(rows * len(p) + ids)  # an entry named twice in one caption counts once
        rows, ids = pairs // len(p), pairs % len(p)
        mean += np.bincount(ids, weights=drawn[rows], minlength=len(p))
        var += np.bincount(ids, weights=drawn[rows] * (1 - drawn[rows]), minlength=len(p))

        out = pq.read_table(shard, columns=["key", MATCHES_COLUMN, "keep_prob"])
        own = out.column(MATCHES_COLUMN).to_pylist()
        for entries in own:
            kept.update(set(entries or ()))
        at = pc.fill_null(pc.index_in(out.column("key"), value_set=pool.column("key")), -1).to_numpy()
        known = at >= 0
        found["not_in_the_pool_matches"] += int((~known).sum())
        pools = matched.take(pa.array(at[known])).to_pylist()
        found["with_other_matched_entries"] += sum(a != b for a, b in zip((o for o, k in zip(own, known) if k), pools))
        keep_prob = pc.fill_null(out.column("keep_prob"), -1.0).to_numpy()[known]
        found["with_a_wrong_keep_prob"] += int((np.abs(keep_prob - q[at[known]]) > 1e-5).sum()
                                               + (q[at[known]] <= 0).sum())
        if online:
            found["matched_pairs_missing"] += int(len(np.setdiff1d(np.flatnonzero(q > 0), at[known])))
        found["kept"] += out.num_rows
        found["expected"] += float(q.sum())
        found["variance"] += float((q * (1 - q)).sum())
    return mean, var, kept, dict(found)


def entries_balanced(asset: str, output: Path, t: float, slack: float, online: bool = False) -> dg.AssetCheckResult:
    """After balancing no entry keeps many more pairs than its keep probabilities promise.

    A pair is kept when any of its entries draws it, so a head entry also keeps
    the pairs its rarer co-entries bring in: a flat cap near t failed correct
    output. Each entry is held to its expected kept count instead, with `slack`
    on top plus four standard deviations and one pair.
    """
    from pipelines.balance import COUNTS_FILE, MATCHES_DIR

    matched, made = len(finished_shards(output / MATCHES_DIR)), len(shard_paths(output))
    if matched != made:  # each output shard's pool rows have their matches file beside it
        return dg.AssetCheckResult(asset_key=asset, check_name=BALANCED, passed=False, metadata={
            "error": f"balance left matches for {matched} of its {made} shards: nothing to judge the kept counts by"})
    try:
        entries = pq.read_table(output / COUNTS_FILE, columns=["entry", "count"])
    except FileNotFoundError as exc:
        return dg.AssetCheckResult(asset_key=asset, check_name=BALANCED, passed=False,
                                   metadata={"error": f"balance left no entry counts to check: {exc}"})
    from curation.balancing import entry_probabilities

    mean, var, kept, rows = balance_tally(output, entry_probabilities(entries.column("count").to_numpy(), t), online)
    names = entries.column("entry").to_pylist()
    limit = mean * (1 + slack) + 4 * np.sqrt(var) + 1

    def described(e: int, n: int) -> tuple[str, dict]:
        return (names[e] if e < len(names) else str(e)), {"kept": n, "expected": round(float(mean[e]), 1)
                                                           if e < len(mean) else None}

    over = dict(described(e, n) for e, n in kept.items() if e >= len(limit) or n > limit[e])
    worst = kept.most_common(5)
    wrong = {k: v for k, v in rows.items() if k not in ("kept", "expected", "variance") and v}
    # Online, every matched pair is kept (a missing one is counted in `wrong`); offline the total is a sum
    # of independent draws, held to its mean as each entry is.
    spread = slack * rows["expected"] + 4 * float(np.sqrt(rows["variance"])) + 1
    total_as_expected = online or abs(rows["kept"] - rows["expected"]) <= spread
    passed = bool(not over and not wrong and total_as_expected)
    return dg.AssetCheckResult(asset_key=asset, check_name=BALANCED, passed=passed, metadata={
        "t": t, "online_curation": online, "max_kept": worst[0][1] if worst else 0,
        "top_entries": dg.MetadataValue.json(dict(described(e, n) for e, n in worst)),
        "entries_over_limit": dg.MetadataValue.json(over),
        "rows_kept": rows["kept"], "rows_expected": round(rows["expected"], 1),
        "kept_rows_wrong": dg.MetadataValue.json(wrong),
    })


def share_filled(asset: str, check_name: str, output: Path, column: str, threshold: float) -> dg.AssetCheckResult:
    """Share of rows whose `column` holds a non-empty value (a list with a non-blank string, or a string)."""
    total = filled = 0
    for value in _column_values(output, column):
        total += 1
        items = value if isinstance(value, list) else [value]
        filled += any(isinstance(v, str) and v.strip() for v in items)
    share = filled / total if total else 0.0
    return dg.AssetCheckResult(asset_key=asset, check_name=check_name, passed=total > 0 and share >= threshold,
                               metadata={"rows": total, "filled": filled, "share": round(share, 4),
                                         "threshold": threshold})


def valid_rewrite_share(asset: str, output: Path, threshold: float) -> dg.AssetCheckResult:
    """Share of the rows chosen for rewriting with at least one real rewrite: a refused slot holds the
    original caption, which is no rewrite. Rows --rewrite_row_fraction left out (rewrites null) were never
    meant to get one: counted among them, a 0.4 fraction failed a 0.5 gate with a perfect LLM."""
    selected = rewritten = not_selected = 0
    for path in shard_paths(output):
        for batch in pq.ParquetFile(path).iter_batches(columns=["caption", "rewrites"]):
            for caption, rewrites in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if rewrites is None:
                    not_selected += 1
                    continue
                selected += 1
                rewritten += any(isinstance(r, str) and r.strip() and r != caption for r in rewrites)
    share = rewritten / selected if selected else 0.0
    return dg.AssetCheckResult(asset_key=asset, check_name=REWRITES, passed=selected > 0 and share >= threshold,
                               metadata={"rows": selected + not_selected, "rows_not_selected": not_selected,
                                         "rewritten": rewritten, "share": round(share, 4), "threshold": threshold})
