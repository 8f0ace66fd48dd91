"""A stage launched through Dagster Pipes in a subprocess: same output, its logs streamed into the run."""

import dagster as dg
import pytest

from assets.definitions import stage_assets
from assets.resources import BeamRunnerResource
from curation.shards import read_manifest
from tests.assets.helpers import add_builds, stage_resources


@pytest.mark.slow
def test_a_stage_runs_through_pipes_and_streams_its_logs(instance, tmp_path):
    add_builds(instance, "inproc", "pipes")
    config = {"ops": {"raw_pairs": {"config": {"demo_pairs": 60}}}}
    for build, launcher in (("inproc", "in_process"), ("pipes", "subprocess")):
        result = dg.materialize(stage_assets, instance=instance, partition_key=build, selection=["raw_pairs"],
                                resources=stage_resources(tmp_path, beam_runner=BeamRunnerResource(launcher=launcher)),
                                run_config=config)
        assert result.success
    pipes_logs = [e.message for e in instance.all_logs(result.run_id) if e.user_message]
    assert any("pipelines.ingest finished" in m for m in pipes_logs), pipes_logs
    in_process, through_pipes = (read_manifest(tmp_path / b / "raw_pairs") for b in ("inproc", "pipes"))
    assert [s["sha256"] for s in in_process["shards"]] == [s["sha256"] for s in through_pipes["shards"]]
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)
