"""When builds start by themselves: a weekly schedule, and a sensor on a folder where URL lists land.

Both make a new partition of `builds` for the build they start, so a
scheduled or sensed build never overwrites another. The sensor keys each run
by the file's content hash (`run_key`), so the same list never starts two
builds, even when it is copied in again under another name; it takes a file
only once it has stopped changing, and hashes each file once (the cursor
keeps its size, mtime and digest). The build reads a copy the sensor took,
`inbox/.taken/<digest>/<name>`, not the inbox file: a list re-exported under
the same name while its build waited in the queue (or before a retry) was
read in its new form, the list that started the build was never built, and
the new one started a second build of the same content.
"""

import datetime as dt
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg

from assets.config import DEMO_SOURCE
from assets.stages import builds
from curation.url_lists import known_format

INBOX_ENV = "CLIP_CURATION_INBOX"
WEEKLY_SOURCE_ENV = "CLIP_CURATION_WEEKLY_SOURCE"
MAX_REMEMBERED = 10_000
# A file modified this recently may still be being copied in: it waits for a later tick, so one list being
# written never starts one build for its first half and another for the whole.
SETTLE_SECONDS = 60
# Seconds one tick may spend hashing new lists. A sensor tick is cut off after 60 s, and a cut-off tick keeps
# no cursor: a backlog of big lists would be hashed again and again and never start a build. Lists left
# unhashed wait for the next tick; at least one is hashed per tick, so a backlog always moves.
HASH_BUDGET_SECONDS = 20.0
# A list bigger than this is named by its size, mtime, first and last SAMPLE_BYTES (a whole read of a few GB
# alone could outlast a tick). With the mtime, an edited list is never taken for one already built; the price
# is that a copy of a huge list under another name starts a build of its own.
FULL_HASH_BYTES = 2 << 30
SAMPLE_BYTES = 64 << 20


def build_job(selection: list[str]):
    """A whole dataset build: every stage's asset for one partition."""
    return dg.define_asset_job(
        "dataset_build", selection=dg.AssetSelection.assets(*selection), partitions_def=builds,
        tags={"clip-curation/gpu": "true"},
        description="Every stage of one dataset build (one partition of 'builds').",
    )


def source_run_config(source: str) -> dict:
    return {"ops": {"raw_pairs": {"config": {"source": source}}}}


def weekly_schedule(job) -> dg.ScheduleDefinition:
    @dg.schedule(job=job, cron_schedule="0 3 * * 1", execution_timezone="UTC", name="weekly_build",
                 description=f"Mondays 03:00 UTC: a new build from ${WEEKLY_SOURCE_ENV} (default: the demo pool).")
    def weekly_build(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        when = context.scheduled_execution_time or dt.datetime.now(dt.timezone.utc)
        key = f"weekly-{when:%Y-%m-%d}"
        if not context.instance.has_dynamic_partition(builds.name, key):
            context.instance.add_dynamic_partitions(builds.name, [key])
        source = os.environ.get(WEEKLY_SOURCE_ENV, DEMO_SOURCE)
        return dg.RunRequest(run_key=key, partition_key=key, run_config=source_run_config(source),
                             tags={"clip-curation/trigger": "schedule"})

    return weekly_build


def _digest(path: Path) -> str:
    """The list's sha256, which names its build; a list over FULL_HASH_BYTES gets the hash of its size, mtime,
    head and tail instead, as reading it all could take one tick past the sensor's timeout, every tick."""
    digest = hashlib.sha256()
    info = path.stat()
    size = info.st_size
    with open(path, "rb") as f:
        if size > FULL_HASH_BYTES:
            digest.update(f"sampled:{size}:{info.st_mtime_ns}:".encode() + f.read(SAMPLE_BYTES))
            f.seek(size - SAMPLE_BYTES)
            digest.update(f.read(SAMPLE_BYTES))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


TAKEN_DIR = ".taken"


def _take(path: Path, digest: str) -> Path | None:
    """The list as it was hashed, kept for its build under `.taken/<digest>/` (hidden: no tick reads it as
    a new list): a copy, checked against the digest (None if the list changed meanwhile: the next tick
    sees it anew); a list over FULL_HASH_BYTES is hard-linked, as copying it could outlast the tick (a
    re-export that replaces the file leaves the link as it was; one that rewrites it in place does not)."""
    taken = path.parent / TAKEN_DIR / digest[:16] / path.name
    if taken.is_file():
        return taken
    taken.parent.mkdir(parents=True, exist_ok=True)
    partial = taken.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    linked = False
    if path.stat().st_size > FULL_HASH_BYTES:
        try:
            os.link(path, partial)
            linked = True
        except OSError:  # a file system without hard links: copied, as a small list is
            pass
    if not linked:
        shutil.copyfile(path, partial)
    if _digest(partial) != digest:
        partial.unlink()
        return None
    os.replace(partial, taken)
    return taken


def inbox_dir() -> Path:
    return Path(os.environ.get(INBOX_ENV, "./inbox")).expanduser().resolve()


def _is_url_list(path: Path) -> bool:
    """A file ingest reads as a URL list by its extension (Parquet, CSV, TSV, JSONL), not hidden."""
    return path.is_file() and not path.name.startswith(".") and known_format(path) is not None


def url_list_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(job=job, name="url_list_sensor", minimum_interval_seconds=30,
               description=f"Starts a build for every new URL list dropped into ${INBOX_ENV} (default ./inbox), "
                           f"once it has not changed for {SETTLE_SECONDS} s.")
    def url_list_arrivals(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        inbox = inbox_dir()
        cursor = json.loads(context.cursor) if context.cursor else {}
        if isinstance(cursor, list):  # the cursor of earlier versions: the digests alone
            cursor = {"digests": cursor}
        seen: list[str] = cursor.get("digests", [])
        hashed: dict[str, list] = cursor.get("files", {})  # name -> [size, mtime_ns, digest]: hashed once
        known = set(seen)
        requests, keys, files = [], [], {}
        now = time.time()
        hashing_since, hashed_now, deferred = time.perf_counter(), 0, 0
        for path in sorted(p for p in inbox.glob("*") if _is_url_list(p)) if inbox.is_dir() else []:
            info = path.stat()
            if now - info.st_mtime < SETTLE_SECONDS:
                continue  # still arriving, perhaps
            cached = hashed.get(path.name)
            same = cached is not None and cached[:2] == [info.st_size, info.st_mtime_ns]
            if not same and hashed_now and time.perf_counter() - hashing_since > HASH_BUDGET_SECONDS:
                deferred += 1  # this tick's hashing budget is spent: the next tick goes on from here
                continue
            if not same:
                hashed_now += 1
            digest = cached[2] if same else _digest(path)
            files[path.name] = [info.st_size, info.st_mtime_ns, digest]
            if digest in known:
                continue
            taken = _take(path, digest)
            if taken is None:
                files.pop(path.name)  # changed since it was hashed: hashed anew on a later tick
                continue
            known.add(digest)
            seen.append(digest)
            key = f"{path.stem}-{digest[:8]}"
            keys.append(key)
            requests.append(dg.RunRequest(run_key=f"url-list-{digest}", partition_key=key,
                                          run_config=source_run_config(str(taken)),
                                          tags={"clip-curation/trigger": "sensor", "clip-curation/url_list": path.name}))
        next_cursor = json.dumps({"digests": seen[-MAX_REMEMBERED:], "files": files})
        if deferred:
            context.log.info(f"{deferred} URL list(s) in {inbox} left to hash on the next tick")
        if not requests:
            waiting = f"; {deferred} left to hash on the next tick" if deferred else ""
            return dg.SensorResult(skip_reason=f"no new URL list in {inbox}{waiting}", cursor=next_cursor)
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=[builds.build_add_request(keys)],
                               cursor=next_cursor)

    return url_list_arrivals
