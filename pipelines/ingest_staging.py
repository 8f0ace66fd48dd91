"""Ingest's staging bookkeeping: when a URL list or image folder staged into `<output>/_staging` can be
trusted, reused or must be cut again.

A list or folder is first staged into Parquet shards, which then are the stage's input shards. What was
staged must match the config it was cut for (the list's fingerprint is part of it), a rerun of the same
config must not parse the whole list again, and a staged shard lost since must be staged again without
making the output look like another run's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from curation.ingest import STAGE
from curation.shards import atomic_write_bytes, finished_shards
from pipelines.common import STAGE_CONFIG, config_mismatch, input_identity, with_new_options_off

STAGING = "_staging"
# What the staged list or folder was cut from, written before staging starts: the stage's own config
# is recorded only once staging is done, so a run stopped halfway through would leave shards that a
# run over an edited list, or with another --list_shard_rows, took for its own.
STAGING_CONFIG = "_staging_config.json"


def _as_recorded(stage_config: dict) -> dict:
    """The config as the stage's JSON records hold it (paths and tuples as JSON has them)."""
    return json.loads(json.dumps(stage_config, default=str))


def _same_config(recorded: dict | None, stage_config: dict) -> bool:
    """Whether a recorded config is this run's, options added since and left off counting as the same."""
    if recorded is None:
        return False
    wanted = _as_recorded(stage_config)
    return with_new_options_off({"config": recorded}, {"config": wanted})["config"] == wanted


def _record(output: Path) -> dict:
    """What `begin_stage` recorded for the output (its config and input shards), or {}."""
    recorded = output / STAGE_CONFIG
    return json.loads(recorded.read_text()) if recorded.is_file() else {}


def _recorded_config(output: Path) -> dict | None:
    """The config `begin_stage` recorded for the output, or None."""
    return _record(output).get("config")


def _staged_shards(output: Path) -> list[list]:
    """[name, size] of each finished staged shard, as the recorded input shards begin with."""
    return [[path.name, path.stat().st_size] for path in finished_shards(output / STAGING / "list")]


def _staged_before(output: Path, stage_config: dict) -> bool:
    """Staging for this very config finished in an earlier run and every shard it recorded as the stage's
    input is still there, by name and size. Staging again would read and parse the whole list (or walk the
    folder and its captions file) only to find every shard written; on a 200k-row CSV that was nine tenths
    of an up-to-date rerun. A shard lost since (a cleanup, a partial restore) is staged again instead.
    A list or folder changed since has another fingerprint, so another config: refused before this is asked
    (see refuse_other_run)."""
    record = _record(output)
    shards = record.get("input_shards")
    return (_same_config(record.get("config"), stage_config) and shards is not None
            and _staged_shards(output) == [shard[:2] for shard in shards])


def _record_restaged(output: Path, stage_config: dict, lost: set[str]) -> None:
    """Record the identity of staged shards that were `lost` and have been staged again.

    `begin_stage` tells an input shard by its modification time too, so a shard staged anew reads as
    another input, and the stage would be refused. Staging is fixed by the config (which holds the list's
    or folder's fingerprint), so a shard staged again from it, of the size recorded, is the one the
    output was made from. One of another size is left for begin_stage to refuse. An entry keeps the
    length it was recorded with: [name, size] from earlier versions is compared by begin_stage as such."""
    record = _record(output)
    if not lost or not _same_config(record.get("config"), stage_config) or record.get("input_shards") is None:
        return
    now = {path.name: path for path in finished_shards(output / STAGING / "list")}
    shards = []
    for entry in record["input_shards"]:
        path = now.get(entry[0])
        again = entry[0] in lost and path is not None and path.stat().st_size == entry[1]
        shards.append(input_identity([path], None)[0][:len(entry)] if again else entry)
    if shards != record["input_shards"]:
        atomic_write_bytes(output / STAGE_CONFIG, json.dumps({**record, "input_shards": shards}, indent=2).encode())


def _lost_staged(output: Path) -> set[str]:
    """Names of recorded input shards whose staged shard is gone."""
    staged = {name for name, _ in _staged_shards(output)}
    return {shard[0] for shard in _record(output).get("input_shards") or []} - staged


def stage_missing(output: Path, stage_config: dict, write: Callable[[], int]) -> None:
    """Run `write` (which writes only the staged shards that are missing) unless staging is all there,
    and record the shards it wrote again in place of the lost ones."""
    if _staged_before(output, stage_config):
        return
    lost = _lost_staged(output)
    write()
    _record_restaged(output, stage_config, lost)


def refuse_other_run(output: Path, stage_config: dict, overwrite: bool) -> Callable[[], None]:
    """Before staging anything into the output: wipe it (overwrite) or refuse a run with another config,
    and drop a staging that was cut for another config (see STAGING_CONFIG). Returns what records the
    config before staging writes a shard (not before: a list that fails on its first line leaves no
    output behind)."""
    if overwrite and output.exists():
        shutil.rmtree(output)
    wanted, previous = _as_recorded(stage_config), _recorded_config(output)
    if previous is not None and not _same_config(previous, stage_config):
        raise config_mismatch(output, {"stage": STAGE, "config": previous}, {"stage": STAGE, "config": wanted})
    staging, stamp = output / STAGING, output / STAGING / STAGING_CONFIG
    if stamp.is_file():
        trusted = _same_config(json.loads(stamp.read_text()), stage_config)
    else:  # staged by a version that wrote no stamp: trusted only once the stage recorded this very config
        trusted = _same_config(previous, stage_config)
    if staging.exists() and not trusted:
        shutil.rmtree(staging)

    def record() -> None:
        if not stamp.is_file():
            staging.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(stamp, json.dumps(wanted, indent=2).encode())
    return record
