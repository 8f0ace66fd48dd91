"""When builds start by themselves: a weekly schedule, and a sensor on a folder where URL lists land.

Both make a new partition of `builds` for the build they start, so a
scheduled or sensed build never overwrites another. The sensor keys each run
by the file's content hash (`run_key`), so the same list never starts two
builds, even when it is copied in again under another name.
"""

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from assets.config import DEMO_SOURCE
from assets.stages import builds

INBOX_ENV = "CLIP_CURATION_INBOX"
WEEKLY_SOURCE_ENV = "CLIP_CURATION_WEEKLY_SOURCE"
URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".txt", ".json", ".jsonl")
MAX_REMEMBERED = 10_000


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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inbox_dir() -> Path:
    return Path(os.environ.get(INBOX_ENV, "./inbox")).expanduser().resolve()


def url_list_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(job=job, name="url_list_sensor", minimum_interval_seconds=30,
               description=f"Starts a build for every new URL list dropped into ${INBOX_ENV} (default ./inbox).")
    def url_list_arrivals(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        inbox = inbox_dir()
        seen: list[str] = json.loads(context.cursor) if context.cursor else []
        known = set(seen)
        requests, keys = [], []
        files = sorted(p for p in inbox.glob("*") if p.is_file() and p.suffix in URL_LIST_SUFFIXES
                       and not p.name.startswith(".")) if inbox.is_dir() else []
        for path in files:
            digest = _digest(path)
            if digest in known:
                continue
            known.add(digest)
            seen.append(digest)
            key = f"{path.stem}-{digest[:8]}"
            keys.append(key)
            requests.append(dg.RunRequest(run_key=f"url-list-{digest}", partition_key=key,
                                          run_config=source_run_config(str(path)),
                                          tags={"clip-curation/trigger": "sensor", "clip-curation/url_list": path.name}))
        if not requests:
            return dg.SensorResult(skip_reason=f"no new URL list in {inbox}")
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=[builds.build_add_request(keys)],
                               cursor=json.dumps(seen[-MAX_REMEMBERED:]))

    return url_list_arrivals
