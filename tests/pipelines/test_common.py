"""The stage lifecycle: an up-to-date rerun reads no input byte; a run with work checks every one first."""

import pyarrow as pa
import pytest

import curation.shards
from curation.schema import PAIR_SCHEMA
from curation.shards import ManifestError, shard_name, write_manifest, write_table_atomic
from pipelines.common import begin_stage, finish_stage


def _input(directory, n_shards: int = 3):
    directory.mkdir()
    rows = [{"key": f"k{i}", "caption": f"caption {i}", "image": b"\xff\xd8", "width": 8, "height": 8,
             "sha256": f"{i:064x}", "source": "t"} for i in range(4)]
    table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
    infos = [write_table_atomic(table, directory / shard_name(i)) for i in range(n_shards)]
    write_manifest(directory, stage="test", config={}, shards=infos)
    return directory


def _finished(tmp_path):
    """An input, and an output the stage finished from it (each input shard copied)."""
    source = _input(tmp_path / "in")
    plan = begin_stage(source, tmp_path / "out", "copy", {"x": 1})
    for i, path in plan.todo:
        (tmp_path / "out" / shard_name(i)).write_bytes(open(path, "rb").read())
    finish_stage(plan, "copy", {"x": 1})
    return source, tmp_path / "out"


def test_an_up_to_date_rerun_hashes_no_input_and_a_rerun_with_work_hashes_it_first(tmp_path, monkeypatch):
    source, output = _finished(tmp_path)
    hashed = []
    real = curation.shards.file_sha256
    monkeypatch.setattr(curation.shards, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    assert begin_stage(source, output, "copy", {"x": 1}).up_to_date and hashed == []
    (output / shard_name(1)).unlink()  # work again: every input shard is checked before any
    with open(source / shard_name(2), "r+b") as f:  # a corrupt input, same size
        f.seek(8)
        f.write(b"\x00\x00")
    with pytest.raises(ManifestError, match="does not match its manifest checksum"):
        begin_stage(source, output, "copy", {"x": 1})
    assert sorted(hashed) == [shard_name(i) for i in range(3)]


def test_a_grown_input_whose_new_shard_is_corrupt_is_refused_before_the_record_names_it(tmp_path):
    """The record was rewritten with the new shard before its bytes were checked: once upstream rebuilt that
    shard, the output (which never read a byte of it) was refused as made from another input."""
    import json

    from pipelines.common import STAGE_CONFIG

    source, output = _finished(tmp_path)
    recorded = (output / STAGE_CONFIG).read_text()
    rows = [{"key": "k9", "caption": "new", "image": b"\xff\xd8", "width": 8, "height": 8, "sha256": "9" * 64,
             "source": "t"}]
    manifest = json.loads((source / "manifest.json").read_text())
    info = write_table_atomic(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), source / shard_name(3))
    write_manifest(source, stage="test", config={}, shards=[*[curation.shards.ShardInfo(**{
        k: s[k] for k in ("name", "rows", "bytes", "sha256")}) for s in manifest["shards"]], info])
    with open(source / shard_name(3), "r+b") as f:  # corrupt after the manifest was written
        f.seek(8)
        f.write(b"\x00\x00")
    with pytest.raises(ManifestError, match="does not match its manifest checksum"):
        begin_stage(source, output, "copy", {"x": 1})
    assert (output / STAGE_CONFIG).read_text() == recorded


def test_an_input_whose_checks_failed_is_refused_before_any_output_is_written(tmp_path):
    from curation.failed_checks import FailedChecksError, record_failed_checks

    source = _input(tmp_path / "in")
    record_failed_checks(source, curation.shards.read_manifest(source), ["reject_ratio_under_threshold"])
    with pytest.raises(FailedChecksError, match="reject_ratio_under_threshold"):
        begin_stage(source, tmp_path / "out", "copy", {"x": 1})
    assert not (tmp_path / "out").exists()
