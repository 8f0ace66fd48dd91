"""The URL-list sensor starts exactly one build per new file; the weekly schedule makes its own partition."""

import datetime as dt
import json
import os
import time

import dagster as dg

from assets.automation import INBOX_ENV, SETTLE_SECONDS, WEEKLY_SOURCE_ENV
from assets.definitions import defs
from assets.stages import builds


def _tick(instance, cursor=None) -> dg.SensorResult:
    sensor = defs.get_repository_def().get_sensor_def("url_list_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    return sensor(context)


def _settled(inbox, *names: str) -> None:
    """Files of the inbox (default: all) as if they had stopped changing a while ago."""
    past = time.time() - 2 * SETTLE_SECONDS
    for path in [inbox / name for name in names] or inbox.iterdir():
        os.utime(path, (past, past))


def test_a_dropped_url_list_starts_exactly_one_build(instance, tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv(INBOX_ENV, str(inbox))
    assert not _tick(instance).run_requests

    (inbox / "crawl-2026-11.csv").write_text("url,caption\nhttps://example.com/a.jpg,a red circle\n")
    (inbox / "notes.md").write_text("not a URL list")
    (inbox / "urls.txt").write_text("https://example.com/a.jpg\n")  # ingest reads no .txt list
    assert not _tick(instance).run_requests  # just written: it may still be being copied in
    _settled(inbox)
    first = _tick(instance)
    (request,) = first.run_requests
    assert request.run_key.startswith("url-list-")
    assert request.partition_key.startswith("crawl-2026-11-")
    # The build reads the list as the sensor saw it, not the inbox file, which may be re-exported meanwhile.
    taken = request.run_config["ops"]["raw_pairs"]["config"]["source"]
    digest = request.run_key.removeprefix("url-list-")
    assert taken == str(inbox / ".taken" / digest[:16] / "crawl-2026-11.csv")
    original = (inbox / "crawl-2026-11.csv").read_bytes()
    (inbox / "crawl-2026-11.csv").write_text("url,caption\nhttps://example.com/z.jpg,a re-export\n")
    assert open(taken, "rb").read() == original
    (inbox / "crawl-2026-11.csv").write_bytes(original)
    _settled(inbox)
    (added,) = first.dynamic_partitions_requests
    assert added.partition_keys == [request.partition_key] and added.partitions_def_name == builds.name

    # The same file on the next tick, and the same content under another name: no new run.
    assert not _tick(instance, first.cursor).run_requests
    (inbox / "copy-of-crawl.csv").write_bytes((inbox / "crawl-2026-11.csv").read_bytes())
    _settled(inbox)
    assert not _tick(instance, first.cursor).run_requests

    (inbox / "crawl-2026-12.csv").write_text("url,caption\nhttps://example.com/b.jpg,two blue squares\n")
    _settled(inbox)
    (second,) = _tick(instance, first.cursor).run_requests
    assert second.run_key != request.run_key
    # A cursor stored by an earlier version (the digests alone) still works.
    old_cursor = json.dumps(json.loads(first.cursor)["digests"])
    assert [r.run_key for r in _tick(instance, old_cursor).run_requests] == [second.run_key]


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


def test_a_file_is_hashed_once_and_a_list_still_arriving_waits(instance, tmp_path, monkeypatch):
    import assets.automation

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv(INBOX_ENV, str(inbox))
    (inbox / "a.csv").write_text("url,caption\nhttps://example.com/a.jpg,a red circle\n")
    _settled(inbox)
    hashed = []
    real = assets.automation._digest

    def counted(path):  # the inbox's lists; not the check of the copy taken for a build
        if not path.name.startswith("."):
            hashed.append(path.name)
        return real(path)
    monkeypatch.setattr(assets.automation, "_digest", counted)
    first = _tick(instance)
    (inbox / "b.csv").write_text("url,caption\n")  # half copied: this tick leaves it alone
    later = _tick(instance, first.cursor)
    assert not later.run_requests and hashed == ["a.csv"]
    with open(inbox / "b.csv", "a") as f:
        f.write("https://example.com/b.jpg,two blue squares\n")
    _settled(inbox, "b.csv")
    (request,) = _tick(instance, later.cursor).run_requests  # one build, for the whole file
    assert request.partition_key.startswith("b-") and hashed == ["a.csv", "b.csv"]


def test_a_backlog_of_lists_is_hashed_a_budget_per_tick(instance, tmp_path, monkeypatch):
    """A tick hashed every new list: with many big ones it ran past the sensor's timeout, kept no cursor,
    and the next tick started over, so no build ever started."""
    import assets.automation

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv(INBOX_ENV, str(inbox))
    for name in ("a", "b", "c"):
        (inbox / f"{name}.csv").write_text(f"url,caption\nhttps://example.com/{name}.jpg,a {name}\n")
    _settled(inbox)
    monkeypatch.setattr(assets.automation, "HASH_BUDGET_SECONDS", 0.0)  # spent by the first list of a tick
    ticks, cursor = [], None
    for _ in range(3):
        result = _tick(instance, cursor)
        ticks.append([r.partition_key[0] for r in result.run_requests])
        cursor = result.cursor
    assert ticks == [["a"], ["b"], ["c"]]  # one list per tick, each once, the backlog moving on every tick
    assert not _tick(instance, cursor).run_requests


def test_a_huge_list_is_named_by_its_size_and_ends(tmp_path, monkeypatch):
    import assets.automation

    monkeypatch.setattr(assets.automation, "FULL_HASH_BYTES", 100)
    monkeypatch.setattr(assets.automation, "SAMPLE_BYTES", 10)
    path = tmp_path / "big.csv"

    def written(data: bytes, mtime: int) -> str:
        path.write_bytes(data)
        os.utime(path, ns=(mtime, mtime))
        return assets.automation._digest(path)

    named = written(b"h" * 10 + b"m" * 200 + b"t" * 10, 1)
    assert written(b"h" * 10 + b"M" * 200 + b"t" * 10, 1) == named  # only the unread middle differs
    assert written(b"h" * 10 + b"M" * 200 + b"t" * 10, 2) != named  # edited since: never taken for the old one
    assert written(b"h" * 10 + b"m" * 200 + b"T" * 10, 1) != named
    path.write_bytes(b"h" * 50)  # under the limit: the whole file
    import hashlib
    assert assets.automation._digest(path) == hashlib.sha256(b"h" * 50).hexdigest()


def test_a_list_that_changed_since_it_was_hashed_is_not_taken(tmp_path):
    from assets.automation import _digest, _take

    path = tmp_path / "crawl.csv"
    path.write_text("url,caption\nhttps://example.com/a.jpg,a red circle\n")
    stale = _digest(path)
    path.write_text("url,caption\nhttps://example.com/b.jpg,another list\n")
    assert _take(path, stale) is None
    assert not [p for p in (tmp_path / ".taken").rglob("*") if p.is_file()]  # no partial copy left
    taken = _take(path, _digest(path))
    assert taken.read_bytes() == path.read_bytes() and _take(path, _digest(path)) == taken
