"""The stage lifecycle: an up-to-date rerun reads no input byte; a run with work checks every one first."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curation.shards
from curation.schema import PAIR_SCHEMA
from curation.shards import ManifestError, shard_name, write_manifest, write_table_atomic
from pipelines.common import REJECTS_DIR, begin_stage, finish_stage, write_stage_shard


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
        write_stage_shard(tmp_path / "out", i, pq.read_table(path))
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


def test_a_finished_shard_whose_size_no_longer_matches_the_manifest_is_made_again(tmp_path, capsys):
    """A bad copy or disk error left every file there: the rerun called the output up to date, and the next
    stage refused it each time."""
    source, output = _finished(tmp_path)
    with open(output / shard_name(1), "ab") as f:
        f.write(b"\0" * 10)
    plan = begin_stage(source, output, "copy", {"x": 1})
    assert not plan.up_to_date and [i for i, _ in plan.todo] == [1]
    assert f"[copy] {shard_name(1)} no longer match(es) the manifest's sizes: making them again" in capsys.readouterr().out


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


def test_a_deleted_rejects_shard_is_made_again_and_every_side_folder_loses_its_temps(tmp_path):
    """The rejects of shard i are part of it: deleted, the shard is to do again (its rejects were out of the
    manifest's counts, and the rerun said "up to date"). A killed run's temp files go from every folder of
    the output, caption_stats and _rewrite_stats too, so that none is published with it."""
    source, output = _finished(tmp_path)
    (output / REJECTS_DIR / shard_name(1)).unlink()
    stats = output / "caption_stats"
    stats.mkdir()
    (stats / ".part-00001.json.tmp-123-abc").write_text("{")
    plan = begin_stage(source, output, "copy", {"x": 1})
    assert not plan.up_to_date and [i for i, _ in plan.todo] == [1]
    assert list(stats.iterdir()) == []


def test_an_output_overlapping_the_input_is_refused_before_overwrite_deletes_anything(tmp_path):
    """--overwrite wiped an --output equal to (or holding) the --input, the input with it; without it, an
    output equal to a manifest-less input was labelled as this stage's output over the input's own shards."""
    from pipelines import balance

    source = _input(tmp_path / "in")
    before = sorted(p.name for p in source.iterdir())
    for output in (source, source / "out", tmp_path):
        with pytest.raises(ValueError, match="overlaps .* which this stage reads"):
            balance.run(["--input", str(source), "--output", str(output), "--overwrite"])
    assert sorted(p.name for p in source.iterdir()) == before and not (source / "out").exists()
    assert begin_stage(source, tmp_path / "out", "copy", {"x": 1}, overwrite=True).todo  # a sibling is fine


def test_a_stage_on_an_output_another_run_is_writing_is_refused_before_it_touches_it(tmp_path):
    """The second run deleted the first one's temp files (it crashed), or with --overwrite the whole output
    while the first went on writing."""
    from curation.output_lock import OutputBusy, output_lock
    from pipelines import balance

    source = _input(tmp_path / "in", n_shards=1)
    with output_lock(tmp_path / "out", "balance"):
        with pytest.raises(OutputBusy, match="being written by another run"):
            balance.run(["--input", str(source), "--output", str(tmp_path / "out"), "--overwrite"])
        assert not (tmp_path / "out").exists()
    assert balance.run(["--input", str(source), "--output", str(tmp_path / "out")]).manifest["stats"]["rows_in"] == 4


def test_a_shardwise_stage_resumes_once_a_shard_it_had_not_done_is_rebuilt(tmp_path):
    """The shard that stopped a run (a bad row, say), rebuilt upstream, made the rerun refused as another
    input, and --overwrite threw the finished shards away; a finished shard's input rebuilt is still refused."""
    from pipelines.common import StageConfigMismatch

    source = _input(tmp_path / "in")
    output = tmp_path / "out"
    plan = begin_stage(source, output, "copy", {"x": 1})
    write_stage_shard(output, 0, pq.read_table(plan.todo[0][1]))  # then the run stopped at shard 1

    def rebuild(index: int) -> None:
        manifest = curation.shards.read_manifest(source)
        table = pq.read_table(source / shard_name(index))
        write_table_atomic(table.slice(0, 2), source / shard_name(index))
        infos = [curation.shards.info_for(source / s["name"]) for s in manifest["shards"]]
        write_manifest(source, stage="test", config={}, shards=infos)

    rebuild(1)
    assert [i for i, _ in begin_stage(source, output, "copy", {"x": 1}).todo] == [1, 2]
    rebuild(0)
    with pytest.raises(StageConfigMismatch, match=r"input_shards differ"):
        begin_stage(source, output, "copy", {"x": 1})
    # A stage over the whole pool (balance, dedup) resumes no rebuilt shard, done or not.
    whole = tmp_path / "whole"
    plan = begin_stage(source, whole, "pool", {"x": 1}, shardwise=False)
    write_stage_shard(whole, 0, pq.read_table(plan.todo[0][1]))
    rebuild(2)
    with pytest.raises(StageConfigMismatch, match=r"input_shards differ"):
        begin_stage(source, whole, "pool", {"x": 1}, shardwise=False)


def test_a_refused_run_writes_nothing_and_an_output_holding_the_metadata_is_refused(tmp_path):
    """The lock is taken after the config and overlap checks: a refused run left a folder and a lock file,
    inside the input for an output there. --overwrite of an output holding the metadata deleted it, and the
    run died in a Beam worker."""
    from pipelines import balance

    source = _input(tmp_path / "in", n_shards=1)
    with pytest.raises(ValueError, match="--t must be positive"):
        balance.run(["--input", str(source), "--output", str(tmp_path / "new" / "out"), "--t", "0"])
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="overlaps"):
        balance.run(["--input", str(source), "--output", str(source / "inside")])
    assert sorted(p.name for p in source.iterdir()) == ["manifest.json", shard_name(0)]
    output = tmp_path / "out"
    output.mkdir()
    (output / "metadata.json").write_text('["caption"]')
    with pytest.raises(ValueError, match=r"overlaps .*metadata.json, which this stage reads"):
        balance.run(["--input", str(source), "--output", str(output), "--metadata", str(output / "metadata.json"),
                     "--overwrite"])
    assert (output / "metadata.json").is_file()


def test_a_run_that_made_nothing_does_not_block_its_corrected_rerun(tmp_path):
    """A run that failed before its first shard (a mistyped model path) left its record, and the rerun with
    the path fixed was refused as another config, --overwrite its only way on."""
    import json

    from pipelines.common import STAGE_CONFIG, StageConfigMismatch

    source = _input(tmp_path / "in")
    begin_stage(source, tmp_path / "out", "copy", {"model": "/models/typo"})
    (tmp_path / "out" / ".part-00000.parquet.tmp-123").write_bytes(b"half")  # a killed write is no work
    plan = begin_stage(source, tmp_path / "out", "copy", {"model": "/models/right"})
    assert json.loads((tmp_path / "out" / STAGE_CONFIG).read_text())["config"] == {"model": "/models/right"}
    write_stage_shard(tmp_path / "out", 0, pq.read_table(plan.todo[0][1]))
    with pytest.raises(StageConfigMismatch, match=r"config\.model differ"):
        begin_stage(source, tmp_path / "out", "copy", {"model": "/models/other"})
