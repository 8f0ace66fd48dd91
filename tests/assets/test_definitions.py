import dagster as dg

from assets.definitions import defs
from assets.resources import BeamRunnerResource, StorageResource


def test_definitions_load_with_assets_and_checks():
    repo = defs.get_repository_def()
    keys = {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()}
    assert "raw_pairs" in keys
    checks = {key.name for key in repo.asset_graph.asset_check_keys}
    assert {"raw_pairs_schema_valid", "raw_pairs_reject_ratio"} <= checks


def test_materialize_raw_pairs_and_its_checks_pass(tmp_path):
    from assets.ingest import raw_pairs, raw_pairs_reject_ratio, raw_pairs_schema_valid
    result = dg.materialize(
        [raw_pairs, raw_pairs_schema_valid, raw_pairs_reject_ratio],
        resources={"storage": StorageResource(root=str(tmp_path)), "beam_runner": BeamRunnerResource()},
        run_config={"ops": {"raw_pairs": {"config": {"demo_pairs": 150}}}},
    )
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 2 and all(e.passed for e in evaluations)
    metadata = result.asset_materializations_for_node("raw_pairs")[0].metadata
    assert metadata["rows_out"].value + sum(metadata["rejects_by_reason"].value.values()) == 150


def test_unknown_runner_fails_naming_the_field():
    import pytest
    with pytest.raises(dg.Failure, match="BeamRunnerResource.runner"):
        BeamRunnerResource(runner="Nope").flags()
