"""A whole dataset build through Dagster on demo data: every check passes, builds stay apart, retries resume."""

import json

import dagster as dg
import pydantic
import pytest

from assets.definitions import stage_assets
from assets.report import rows_in
from assets.stages import available_stages
from curation.failed_checks import FailedChecksError, verify_input
from curation.shards import OVERWRITE_SENTINEL, read_manifest
from pipelines.common import STAGE_CONFIG
from tests.assets.helpers import add_builds, demo_run_config, failing_reject_ratio, stage_resources


def _materialize(instance, root, build, run_config, selection=None, **resources):
    return dg.materialize(stage_assets, instance=instance, partition_key=build, selection=selection,
                          resources=stage_resources(root, **resources), run_config=run_config)


def _files(directory):
    return {p.relative_to(directory): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_whole_graph_builds_and_every_check_passes(instance, tmp_path):
    add_builds(instance, "b1")
    result = _materialize(instance, tmp_path, "b1", demo_run_config())
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    expected = sum(len(a.check_specs_by_output_name) for a in stage_assets)
    assert len(evaluations) == expected
    failed = [(e.asset_key.to_user_string(), e.check_name, e.metadata) for e in evaluations if not e.passed]
    assert not failed
    for stage in available_stages():
        (materialization,) = result.asset_materializations_for_node(stage.asset)[:1]
        assert materialization.partition == "b1"
        if stage.pair_output:
            metadata = materialization.metadata
            manifest = read_manifest(tmp_path / "b1" / stage.asset)
            assert metadata["rows_out"].value == manifest["rows"]
            assert metadata["bytes"].value == manifest["bytes"]
            assert metadata["rows_in"].value >= metadata["rows_out"].value
            assert len(metadata["shard_paths"].value) == len(manifest["shards"])
            assert "sample_rows" in metadata and metadata["sample_rows"].value.startswith("| key")
            for name in manifest.get("stats", {}).get("plots", []):
                assert any(key.startswith("plot_") for key in metadata)


def test_builds_are_partitions_that_never_touch_each_other(instance, tmp_path):
    add_builds(instance, "b1", "b2")
    config = {"ops": {"raw_pairs": {"config": {"demo_pairs": 120}}}}
    assert _materialize(instance, tmp_path, "b1", config, selection=["raw_pairs"]).success
    before = _files(tmp_path / "b1")
    result = _materialize(instance, tmp_path, "b2", {"ops": {"raw_pairs": {"config": {
        "demo_pairs": 80, "overwrite": True}}}}, selection=["raw_pairs"])
    assert result.success
    assert _files(tmp_path / "b1") == before
    assert read_manifest(tmp_path / "b1" / "raw_pairs")["rows"] != read_manifest(tmp_path / "b2" / "raw_pairs")["rows"]
    keys = instance.get_materialized_partitions(dg.AssetKey("raw_pairs"))
    assert keys == {"b1", "b2"}


def test_a_retried_stage_resumes_from_its_finished_shards(instance, tmp_path):
    """A step that died half-way (a shard and the manifest missing) redoes only the missing shard."""
    add_builds(instance, "b1")
    config = {"ops": {"raw_pairs": {"config": {"demo_pairs": 120, "demo_shard_rows": 40}}}}
    assert _materialize(instance, tmp_path, "b1", config, selection=["raw_pairs"]).success
    output = tmp_path / "b1" / "raw_pairs"
    full = read_manifest(output)
    shards = sorted(output.glob("part-*.parquet"))
    assert len(shards) == 3
    kept_mtime = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    shards[-1].unlink()
    (output / "manifest.json").unlink()
    result = _materialize(instance, tmp_path, "b1", config, selection=["raw_pairs"])
    assert result.success
    stats = result.asset_materializations_for_node("raw_pairs")[0].metadata["stats"].value
    assert stats["resumed_shards"] == len(shards) - 1
    assert {p.name: p.stat().st_mtime_ns for p in sorted(output.glob("part-*.parquet"))[:-1]} == kept_mtime
    assert read_manifest(output)["shards"] == full["shards"]


def test_a_rebuilt_upstream_makes_the_downstream_rebuild(instance, tmp_path):
    stages = available_stages()
    if len(stages) < 2:
        pytest.skip("needs a second stage after ingest")
    add_builds(instance, "b1")
    selection = ["raw_pairs", stages[1].asset, *stages[1].extra_assets]
    config = demo_run_config(pairs=120)
    config["ops"] = {k: v for k, v in config["ops"].items() if k in selection}
    assert _materialize(instance, tmp_path, "b1", config, selection=selection).success
    config["ops"]["raw_pairs"]["config"].update(overwrite=True, demo_pairs=90)
    result = _materialize(instance, tmp_path, "b1", config, selection=selection)
    assert result.success
    upstream = read_manifest(tmp_path / "b1" / "raw_pairs")
    downstream = read_manifest(tmp_path / "b1" / stages[1].asset)
    assert upstream["rows"] <= 90
    assert rows_in(downstream) == upstream["rows"]


def test_a_retry_after_an_upstream_rebuild_resumes_instead_of_wiping_again(instance, tmp_path, monkeypatch):
    """The upstream marker was written only after a successful run: every retry wiped the output again."""
    import pipelines.balance

    add_builds(instance, "b1")
    selection = ["raw_pairs", "balanced_pairs", "entry_counts"]
    config = demo_run_config(pairs=120)
    config["ops"] = {k: v for k, v in config["ops"].items() if k in selection}
    assert _materialize(instance, tmp_path, "b1", config, selection=selection).success
    config["ops"]["raw_pairs"]["config"].update(overwrite=True, demo_pairs=90)
    assert _materialize(instance, tmp_path, "b1", {"ops": {"raw_pairs": config["ops"]["raw_pairs"]}},
                        selection=["raw_pairs"]).success
    real = pipelines.balance.run

    def dies_after_its_work(argv, *args, **kwargs):
        real(argv, *args, **kwargs)
        raise RuntimeError("worker lost (injected)")

    monkeypatch.setattr(pipelines.balance, "run", dies_after_its_work)
    balance_only = {"ops": {"balanced_pairs": config["ops"]["balanced_pairs"]}}
    with pytest.raises(Exception, match="worker lost"):
        _materialize(instance, tmp_path, "b1", balance_only, selection=["balanced_pairs", "entry_counts"])
    output = tmp_path / "b1" / "balanced_pairs"
    made = {p.name: p.stat().st_mtime_ns for p in output.glob("part-*.parquet")}
    assert made
    monkeypatch.setattr(pipelines.balance, "run", real)
    assert _materialize(instance, tmp_path, "b1", balance_only, selection=["balanced_pairs", "entry_counts"]).success
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("part-*.parquet")} == made
    assert rows_in(read_manifest(output)) == read_manifest(tmp_path / "b1" / "raw_pairs")["rows"]


def _context(run_id: str, root: str | None = None):
    from types import SimpleNamespace

    return SimpleNamespace(run=SimpleNamespace(run_id=run_id, root_run_id=root))


def test_overwrite_wipes_once_per_run_however_its_first_attempt_ended(tmp_path):
    """The wipe was recorded before the job ran (a job failing before its wipe left the retry resuming the
    output it should have replaced), then only after it returned (a killed step left the retry wiping again)."""
    import shutil

    from assets.build_records import overwrite_pending

    stage = available_stages()[0]
    output = tmp_path / stage.asset
    output.mkdir()
    (output / STAGE_CONFIG).write_text("{}")
    assert overwrite_pending(tmp_path, stage.asset, output, _context("r1"))
    assert overwrite_pending(tmp_path, stage.asset, output, _context("r2", "r1"))  # failed before its wipe: again
    shutil.rmtree(output)  # the job's wipe; it starts over, then its process is killed
    output.mkdir()
    (output / "part-00000.parquet").write_bytes(b"made by the killed attempt")
    assert not overwrite_pending(tmp_path, stage.asset, output, _context("r3", "r1"))  # the retry resumes
    assert overwrite_pending(tmp_path, stage.asset, output, _context("r4"))  # a new run that asks to overwrite does
    empty = tmp_path / "empty"
    assert overwrite_pending(tmp_path, available_stages()[1].asset, empty, _context("r5")) and not empty.exists()


def test_an_overwrite_counts_as_done_only_once_the_job_has_wiped(instance, tmp_path, monkeypatch):
    """Through Dagster: a job that fails before its wipe leaves it to the retry; one that dies after it not."""
    import pipelines.ingest
    from assets.build_records import overwrite_pending

    add_builds(instance, "b1")
    ops = {"raw_pairs": demo_run_config(pairs=60)["ops"]["raw_pairs"]}
    assert _materialize(instance, tmp_path, "b1", {"ops": ops}, selection=["raw_pairs"]).success
    ops["raw_pairs"]["config"]["overwrite"] = True
    stage, output = available_stages()[0], tmp_path / "b1" / "raw_pairs"
    real = pipelines.ingest.run

    def fails_before_its_wipe(argv, *args, **kwargs):
        raise RuntimeError("could not reach the input (injected)")

    def dies_after_its_work(argv, *args, **kwargs):
        real(argv, *args, **kwargs)
        raise RuntimeError("worker lost (injected)")

    for job, wiped in ((fails_before_its_wipe, False), (dies_after_its_work, True)):
        monkeypatch.setattr(pipelines.ingest, "run", job)
        with pytest.raises(Exception, match="could not reach|worker lost"):
            _materialize(instance, tmp_path, "b1", {"ops": ops}, selection=["raw_pairs"])
        retry = _context("retry", instance.get_runs(limit=1)[0].run_id)
        assert overwrite_pending(tmp_path / "b1", stage.asset, output, retry) is not wiped
        if not wiped:  # a run without overwrite resumes it: the sentinel is gone, nor can that run wipe it now
            monkeypatch.setattr(pipelines.ingest, "run", real)
            plain = {"ops": {"raw_pairs": {"config": {**ops["raw_pairs"]["config"], "overwrite": False}}}}
            assert _materialize(instance, tmp_path, "b1", plain, selection=["raw_pairs"]).success
            assert not (output / OVERWRITE_SENTINEL).exists()
            assert not overwrite_pending(tmp_path / "b1", stage.asset, output, retry)


def test_a_failing_blocking_check_stops_the_assets_downstream(instance, tmp_path, monkeypatch):
    stages = available_stages()
    if len(stages) < 2:
        pytest.skip("needs a second stage after ingest")
    add_builds(instance, "b1")
    with monkeypatch.context() as patch:
        failing_reject_ratio(patch)
        result = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                                selection=["raw_pairs", stages[1].asset, *stages[1].extra_assets],
                                run_config={"ops": {k: v for k, v in demo_run_config(pairs=60)["ops"].items()
                                                    if k in ("raw_pairs", stages[1].asset)}},
                                resources=stage_resources(tmp_path))
    assert not result.success
    failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
    assert failed == ["reject_ratio_under_threshold"]
    assert result.asset_materializations_for_node("raw_pairs")
    assert not (tmp_path / "b1" / stages[1].asset).exists()
    # A later run of the downstream asset alone (the UI's Materialize on it) refuses the failed output too.
    downstream = {"ops": {stages[1].asset: demo_run_config(pairs=60)["ops"][stages[1].asset]}}
    with pytest.raises(dg.Failure, match="upstream raw_pairs of build 'b1' failed its checks "
                                         r"\(reject_ratio_under_threshold\)"):
        _materialize(instance, tmp_path, "b1", downstream, selection=[stages[1].asset, *stages[1].extra_assets])
    assert not (tmp_path / "b1" / stages[1].asset).exists()
    # The record sits in the output itself: whatever reads it from the command line is refused too.
    with pytest.raises(FailedChecksError, match=r"\(reject_ratio_under_threshold\)"):
        verify_input(tmp_path / "b1" / "raw_pairs")
    # Once raw_pairs passes (here under the default gates, its output unchanged), the downstream builds on it.
    raw_only = {"ops": {"raw_pairs": demo_run_config(pairs=60)["ops"]["raw_pairs"]}}
    assert _materialize(instance, tmp_path, "b1", raw_only, selection=["raw_pairs"]).success
    assert _materialize(instance, tmp_path, "b1", downstream, selection=[stages[1].asset, *stages[1].extra_assets]).success
    assert verify_input(tmp_path / "b1" / "raw_pairs")


def test_an_output_whose_checks_never_finished_is_not_read_as_finished(instance, tmp_path, monkeypatch):
    """A step that died while its checks ran recorded nothing, so a downstream run and the CLI read the
    never-judged output as a finished dataset."""
    from assets import checks

    stages = available_stages()
    if len(stages) < 2:
        pytest.skip("needs a second stage after ingest")
    add_builds(instance, "b1")
    raw_only = {"ops": {"raw_pairs": demo_run_config(pairs=60)["ops"]["raw_pairs"]}}

    def killed(*args, **kwargs):
        raise RuntimeError("terminated while the checks read the shards")

    with monkeypatch.context() as patch:
        patch.setattr(checks, "schema_valid", killed)
        with pytest.raises(RuntimeError, match="terminated"):
            _materialize(instance, tmp_path, "b1", raw_only, selection=["raw_pairs"])
    assert read_manifest(tmp_path / "b1" / "raw_pairs")["rows"]  # the job itself finished
    with pytest.raises(FailedChecksError, match=r"\(checks_not_finished\)"):
        verify_input(tmp_path / "b1" / "raw_pairs")
    downstream = {"ops": {stages[1].asset: demo_run_config(pairs=60)["ops"][stages[1].asset]}}
    with pytest.raises(dg.Failure, match=r"upstream raw_pairs of build 'b1' failed its checks \(checks_not_finished\)"):
        _materialize(instance, tmp_path, "b1", downstream, selection=[stages[1].asset, *stages[1].extra_assets])
    # Judged by the next materialisation (nothing to redo), the output is read again.
    assert _materialize(instance, tmp_path, "b1", raw_only, selection=["raw_pairs"]).success
    assert verify_input(tmp_path / "b1" / "raw_pairs")


def test_failed_checks_recorded_by_an_earlier_version_are_still_honoured(tmp_path):
    """Versions before the record moved into the output kept it under B/.upstream: a build made by one
    must not become readable by the upgrade; the next judgement moves the record into the output."""
    from assets.build_records import UPSTREAM_MARKER, failed_upstream_checks, record_checks
    from curation.failed_checks import manifest_fingerprint

    manifest = {"shards": [{"sha256": "0" * 64}]}
    (tmp_path / "raw_pairs").mkdir()
    legacy = tmp_path / UPSTREAM_MARKER / "raw_pairs.failed-checks.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"manifest": manifest_fingerprint(manifest), "failed": ["schema_valid"]}))
    assert failed_upstream_checks(tmp_path, "raw_pairs", manifest) == ["schema_valid"]
    assert failed_upstream_checks(tmp_path, "raw_pairs", {"shards": [{"sha256": "1" * 64}]}) == []
    record_checks(tmp_path, "raw_pairs", manifest, ["rows_conserved"])
    assert not legacy.exists() and failed_upstream_checks(tmp_path, "raw_pairs", manifest) == ["rows_conserved"]


def test_a_corrupt_upstream_shard_fails_the_step_before_anything_is_written(instance, tmp_path):
    """The step reads the upstream manifest and leaves the checksums to the job, which refuses the shard."""
    add_builds(instance, "b1")
    selection = ["raw_pairs", "balanced_pairs", "entry_counts"]
    config = demo_run_config(pairs=120)
    config["ops"] = {k: v for k, v in config["ops"].items() if k in selection}
    assert _materialize(instance, tmp_path, "b1", {"ops": {"raw_pairs": config["ops"]["raw_pairs"]}},
                        selection=["raw_pairs"]).success
    shard = sorted((tmp_path / "b1" / "raw_pairs").glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    shard.write_bytes(bytes(data))
    balance_only = {"ops": {"balanced_pairs": config["ops"]["balanced_pairs"]}}
    with pytest.raises(Exception, match="does not match its manifest checksum"):
        _materialize(instance, tmp_path, "b1", balance_only, selection=["balanced_pairs", "entry_counts"])
    assert not list((tmp_path / "b1" / "balanced_pairs").glob("part-*.parquet"))


def test_a_demo_that_fails_to_generate_leaves_the_builds_demo_as_it_was(instance, tmp_path, monkeypatch):
    """The old demo was deleted before the new one was generated: a failure left raw_pairs without its
    input, and a later downstream-only run failed on the missing metadata."""
    from curation import demo_data

    add_builds(instance, "b1")
    assert _materialize(instance, tmp_path, "b1", {"ops": {"raw_pairs": {"config": {"demo_pairs": 60}}}},
                        selection=["raw_pairs"]).success
    before = _files(tmp_path / "b1" / "demo")
    real = demo_data.generate

    def dies_midway(out_dir, **kw):
        real(out_dir, **{**kw, "n_pairs": 5})
        raise MemoryError("killed while generating")

    monkeypatch.setattr(demo_data, "generate", dies_midway)
    with pytest.raises(MemoryError):
        _materialize(instance, tmp_path, "b1", {"ops": {"raw_pairs": {"config": {"demo_pairs": 70, "overwrite": True}}}},
                     selection=["raw_pairs"])
    assert _files(tmp_path / "b1" / "demo") == before
    monkeypatch.setattr(demo_data, "generate", real)
    for bad in ({"demo_pairs": 0}, {"demo_shard_rows": -1}):  # refused before the step does anything
        with pytest.raises(pydantic.ValidationError, match=rf"{next(iter(bad))}\n.*greater than 0"):
            _materialize(instance, tmp_path, "b1", {"ops": {"raw_pairs": {"config": bad}}}, selection=["raw_pairs"])
    assert _files(tmp_path / "b1" / "demo") == before
    assert _materialize(instance, tmp_path, "b1", {"ops": {"raw_pairs": {"config": {"demo_pairs": 70, "overwrite": True}}}},
                        selection=["raw_pairs"]).success
    assert not (tmp_path / "b1" / ".demo.partial").exists()
    assert json.loads((tmp_path / "b1" / "demo" / "demo_params.json").read_text())["n_pairs"] == 70


def _refusal(instance, root, build, config) -> str:
    result = dg.materialize(stage_assets, instance=instance, partition_key=build, selection=["raw_pairs"],
                            resources=stage_resources(root), run_config={"ops": {"raw_pairs": {"config": config}}},
                            raise_on_error=False)
    assert not result.success
    events = [e for e in result.all_events if e.is_failure and hasattr(e.event_specific_data, "error")]
    return "\n".join(str(e.event_specific_data.error) for e in events)


def test_a_default_config_run_keeps_the_builds_own_source_and_another_needs_overwrite(instance, tmp_path):
    """A build recorded nothing of its source and the config's default named the demo: a plain Materialize
    (or a backfill) of a build made from a crawl replaced its raw pairs, and so every stage, with demo data."""
    from curation.demo_data import generate

    generate(tmp_path / "crawl", n_pairs=40, n_eval=10)
    add_builds(instance, "b1", "b2")
    root = tmp_path / "root"
    crawl = {"source": str(tmp_path / "crawl" / "pool")}
    assert _materialize(instance, root, "b1", {"ops": {"raw_pairs": {"config": crawl}}}, selection=["raw_pairs"]).success
    made = _files(root / "b1" / "raw_pairs")
    again = _materialize(instance, root, "b1", {}, selection=["raw_pairs"])  # the launchpad's defaults
    assert again.success and _files(root / "b1" / "raw_pairs") == made and not (root / "b1" / "demo").exists()
    message = _refusal(instance, root, "b1", {"source": "demo"})
    assert f"build 'b1' was made from {tmp_path / 'crawl' / 'pool'}; IngestRunConfig source asks for another" in message
    assert "set overwrite: true" in message and _files(root / "b1" / "raw_pairs") == made
    # A demo build keeps its own size and seed; another is refused, naming the fields, unless overwritten.
    assert _materialize(instance, root, "b2", {"ops": {"raw_pairs": {"config": {"demo_pairs": 60}}}},
                        selection=["raw_pairs"]).success
    demo = (_files(root / "b2" / "demo"), _files(root / "b2" / "raw_pairs"))
    assert _materialize(instance, root, "b2", {}, selection=["raw_pairs"]).success
    assert (_files(root / "b2" / "demo"), _files(root / "b2" / "raw_pairs")) == demo
    message = _refusal(instance, root, "b2", {"demo_pairs": 70, "seed": 3})
    assert "made from a demo of 60 pairs, seed 0 and 500 rows per shard; IngestRunConfig demo_pairs/seed" in message
    assert (_files(root / "b2" / "demo"), _files(root / "b2" / "raw_pairs")) == demo
    # A build from before the record, not from the demo: its source must be named once.
    (root / "b1" / ".upstream" / "source.json").unlink()
    assert "ingested before builds recorded their source" in _refusal(instance, root, "b1", {})
    assert _materialize(instance, root, "b1", {"ops": {"raw_pairs": {"config": crawl}}}, selection=["raw_pairs"]).success
    assert _files(root / "b1" / "raw_pairs") == made
