"""The URL-list sensor starts exactly one build per new file; the weekly schedule makes its own partition."""

import datetime as dt

import dagster as dg

from assets.automation import INBOX_ENV, WEEKLY_SOURCE_ENV
from assets.definitions import defs
from assets.stages import builds


def _tick(instance, cursor=None) -> dg.SensorResult:
    sensor = defs.get_repository_def().get_sensor_def("url_list_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    return sensor(context)


def test_a_dropped_url_list_starts_exactly_one_build(instance, tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv(INBOX_ENV, str(inbox))
    assert not _tick(instance).run_requests

    (inbox / "crawl-2026-11.csv").write_text("url,caption\nhttps://example.com/a.jpg,a red circle\n")
    (inbox / "notes.md").write_text("not a URL list")
    first = _tick(instance)
    (request,) = first.run_requests
    assert request.run_key.startswith("url-list-")
    assert request.partition_key.startswith("crawl-2026-11-")
    assert request.run_config["ops"]["raw_pairs"]["config"]["source"] == str(inbox / "crawl-2026-11.csv")
    (added,) = first.dynamic_partitions_requests
    assert added.partition_keys == [request.partition_key] and added.partitions_def_name == builds.name

    # The same file on the next tick, and the same content under another name: no new run.
    assert not _tick(instance, first.cursor).run_requests
    (inbox / "copy-of-crawl.csv").write_bytes((inbox / "crawl-2026-11.csv").read_bytes())
    assert not _tick(instance, first.cursor).run_requests

    (inbox / "crawl-2026-12.csv").write_text("url,caption\nhttps://example.com/b.jpg,two blue squares\n")
    (second,) = _tick(instance, first.cursor).run_requests
    assert second.run_key != request.run_key


def test_weekly_schedule_makes_its_build_partition(instance, monkeypatch):
    monkeypatch.setenv(WEEKLY_SOURCE_ENV, "/data/weekly-pool")
    schedule = defs.get_repository_def().get_schedule_def("weekly_build")
    when = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.timezone.utc)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when)
    request = schedule(context)
    assert request.partition_key == "weekly-2026-11-23"
    assert request.run_key == "weekly-2026-11-23"
    assert instance.has_dynamic_partition(builds.name, "weekly-2026-11-23")
    assert request.run_config["ops"]["raw_pairs"]["config"]["source"] == "/data/weekly-pool"
