"""Online curation (MetaCLIP): each row kept with its probability, drawn anew every epoch, at any t.

MetaCLIP's balancing can run in the data loader: the balance stage, run with
`--online_curation`, keeps every matched pair with its matched entry ids and
its keep_prob at the stage's t, and writes the pool's per-entry match counts
(`entry_counts.parquet`). The trainer keeps a row with that keep_prob, or,
with `--t`, with 1 - prod_e(1 - p_e), p_e = t / max(count_e, t), computed by
the balance stage's own functions (`curation.balancing`) so the two cannot drift.

Where the counts are: every stage directory records the directory it read
(`_stage_config.json`, written by `pipelines.common.begin_stage`); following
that chain back from the shards reaches the balance output, whose manifest
names its counts file under `stats`. `--entry_counts` names the file directly
(for shards copied away from their chain).

Double subsampling: shards balanced offline were already sampled at t, and a
second draw in the loader would sample them again. The manifest's lineage
records every upstream stage's config, so a balance stage that ran without
`online_curation` upstream of the input is refused. Shards without a manifest
(copied away from their stage) carry keep_prob and matched_entries either way,
and so does the entry counts file, so nothing can tell: they are refused unless
the user states with `--assume_online_balanced` that they were balanced online.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.balancing import entry_probabilities, keep_probabilities
from curation.schema import SchemaError
from curation.shards import STAGE_CONFIG, is_complete, manifest_fingerprint, read_manifest
from training.config import TrainConfig
from training.shard_set import ShardSet, column_leaves

if TYPE_CHECKING:
    from curation.datacard import StageRecord

BALANCE = "balance"
# The balance settings entry ids and counts depend on: another metadata list numbers other entries.
MATCHING = ("metadata_sha256", "case_fold", "metaclip2_padding")


def balance_records(source: str | Path) -> list[dict]:
    """The balance stages' records in the input manifest's lineage."""
    return [r for r in read_manifest(source).get("lineage", []) if r.get("stage") == BALANCE]


def balance_configs(source: str | Path) -> list[dict]:
    """The configs of the balance stages in the input manifest's lineage."""
    return [r.get("config") or {} for r in balance_records(source)]


def check_not_subsampled(source: str | Path, assume_online_balanced: bool = False) -> None:
    """Refuse online curation of shards the balance stage already sampled offline, or that cannot be checked."""
    if not is_complete(source):
        if assume_online_balanced:
            return
        raise ValueError(f"{source} has no manifest, so whether its rows were already sampled by an offline balance "
                         f"(which --online_curation would sample a second time) cannot be checked. Train on the "
                         f"balance stage's output itself, or pass --assume_online_balanced if these shards come "
                         f"from a balance run with --online_curation.")
    configs = balance_configs(source)
    if not configs and not assume_online_balanced:
        raise ValueError(f"{source}'s manifest records no balance stage (shards exported from a copy without its "
                         f"manifest, say), so whether its rows were already sampled offline cannot be checked. "
                         f"Export the balance stage's output itself, or pass --assume_online_balanced if they come "
                         f"from a balance run with --online_curation.")
    offline = [c for c in configs if not c.get("online_curation")]
    if offline:
        raise ValueError(f"{source} was balanced offline (balance t={offline[-1].get('t')}): its rows were already "
                         f"sampled with their keep_prob, and --online_curation would sample them a second time. "
                         f"Rebalance with --online_curation, or train without --online_curation.")


def find_entry_counts(source: str | Path) -> Path:
    """The entry counts of the balance stage upstream of `source`, found through the stage chain."""
    from curation.datacard import upstream_stages  # imports matplotlib: only when a run asks for another t

    records = upstream_stages(source, STAGE_CONFIG)
    for record in reversed(records):
        if record.stage == BALANCE:
            _check_same_matching(source, record)
            name = record.stats.get("entry_counts")
            if name and (record.directory / str(name)).is_file():
                return record.directory / str(name)
            raise FileNotFoundError(f"the balance stage at {record.directory} names no entry counts file that "
                                    f"exists (stats.entry_counts = {name!r}); pass --entry_counts")
    seen = ", ".join(f"{r.stage} ({r.directory})" for r in records) or "none"
    raise FileNotFoundError(f"--t needs the balance stage's entry counts, and no balance stage is reachable from "
                            f"{source} through the stages' recorded inputs (stages found: {seen}). Pass "
                            f"--entry_counts PATH/entry_counts.parquet, or train with the shards' own keep_prob "
                            f"(no --t).")


def _check_same_matching(source: str | Path, record: StageRecord) -> None:
    """Refuse a balance output rebuilt since `source` was made from it (`--overwrite` with another metadata
    list, or over another pool): its counts belong to other entry ids or other pairs, and would curate every
    row by them, silently. The lineage names the balance output's shards by fingerprint; a lineage written
    before it did is held to the settings the ids depend on."""
    recorded = balance_records(source)
    if not recorded:
        return
    if (made := recorded[-1].get("shards_fingerprint")) and made != manifest_fingerprint(record.manifest):
        changes = "its shards are not the ones the lineage names"
    else:
        made_with = {k: (recorded[-1].get("config") or {}).get(k) for k in MATCHING}
        found = {k: (record.manifest.get("config") or {}).get(k) for k in MATCHING}
        changes = "; ".join(f"{k} {found[k]!r}, the shards' lineage {made_with[k]!r}" for k in MATCHING
                            if made_with[k] != found[k])
    if changes:
        raise ValueError(f"the balance output at {record.directory} was rebuilt since {source} was made from it "
                         f"({changes}), so its entry counts are not those these shards were balanced by. Pass "
                         f"--entry_counts with the counts of the balance run that made these shards, or rebuild "
                         f"the stages after balance.")


def entry_probabilities_for(source: str | Path, t: float, entry_counts: str = "") -> np.ndarray:
    """p_e = t / max(count_e, t) for every metadata entry, from the balance stage's pool counts."""
    path = Path(entry_counts) if entry_counts else find_entry_counts(source)
    if not path.is_file():
        raise FileNotFoundError(f"no entry counts file at {path}")
    counts = pq.read_table(path, columns=["count"]).column("count").to_numpy()
    return entry_probabilities(counts, t)


def curation_probabilities(config: TrainConfig) -> np.ndarray | None:
    """Checked before training: the per-entry probabilities at `config.t`, or None to use each row's keep_prob."""
    if not config.online_curation:
        return None
    check_not_subsampled(config.input, config.assume_online_balanced)
    return entry_probabilities_for(config.input, config.t, config.entry_counts) if config.t else None


def check_curation_column(shards: ShardSet, t: float) -> None:
    """Online curation reads one column from every shard (what inspect_shards found in the footers). A shard
    without its values read as nulls: kept whole (keep_prob) or dropped whole (matched_entries under --t),
    either way not curated."""
    column = "matched_entries" if t else "keep_prob"
    lacking = [path for path in shards.file_columns if column not in shards.file_values[path]]
    if lacking:
        raise SchemaError(f"online curation reads {column} from every shard, and {len(lacking)} of {shards.shards} "
                          f"lack it; curate them with the balance stage first", file=lacking[0], column=column)


def check_entry_ids(shards: ShardSet, entry_p: np.ndarray) -> None:
    """Every shard's entry ids name an entry of the counts, checked before training: a counts file of other
    metadata, or a null id, is refused here, and not mid-epoch, hours and checkpoints in. The footers'
    min and max suffice for a row group without nulls; one with nulls (a null list or a null id, which a
    footer does not tell apart) or without statistics has the column read."""
    for path in shards.file_columns:
        if "matched_entries" not in shards.file_values[path]:
            continue
        parquet = pq.ParquetFile(path)
        (leaf,) = column_leaves(parquet, "matched_entries")
        first_row = 0
        for g in range(parquet.metadata.num_row_groups):
            group = parquet.metadata.row_group(g)
            stats = group.column(leaf).statistics
            if stats is not None and stats.has_min_max and stats.has_null_count and not stats.null_count:
                low, high = stats.min, stats.max
            else:
                lists = parquet.read_row_group(g, columns=["matched_entries"]).column("matched_entries")
                lists = lists.combine_chunks()
                ids = pc.list_flatten(lists)
                if ids.null_count:
                    parent = pc.list_parent_indices(lists).to_numpy()[pc.index(pc.is_null(ids), True).as_py()]
                    raise SchemaError("matched_entries holds a null entry id, which names no entry; balance these "
                                      "shards again", file=path, column="matched_entries",
                                      row=first_row + int(parent) + 1)
                low, high = (pc.min(ids).as_py(), pc.max(ids).as_py()) if len(ids) else (0, -1)
            first_row += group.num_rows
            if low < 0 or high >= len(entry_p):
                raise SchemaError(f"matched_entries holds entry id {low if low < 0 else high}, which is not one of "
                                  f"the {len(entry_p)} entry counts; the counts belong to other metadata than "
                                  f"these shards", file=path, column="matched_entries")


def keep_probabilities_of(table: pa.Table, entry_p: np.ndarray | None, where: str) -> np.ndarray:
    """Each row's keep probability: from matched_entries at the run's t, else its keep_prob (null: kept)."""
    if entry_p is None:
        return pc.fill_null(table.column("keep_prob"), 1.0).to_numpy()
    matched = table.column("matched_entries").combine_chunks()
    ids = pc.list_flatten(matched)
    if ids.null_count or (len(ids) and pc.min(ids).as_py() < 0):
        raise ValueError(f"{where}: matched_entries holds a null or negative entry id, which names no metadata "
                         f"entry; balance these shards again")
    highest = pc.max(ids).as_py() if len(ids) else None
    if highest is not None and highest >= len(entry_p):
        raise ValueError(f"{where}: matched entry id {highest} is beyond the {len(entry_p)} entry counts; the "
                         f"counts belong to other metadata than these shards")
    return keep_probabilities(matched, entry_p)
