"""Misconfigured resources fail the run before any stage writes, naming the field; remote storage publishes."""

import dagster as dg
import fsspec
import pytest

from assets.definitions import stage_assets
from assets.resources import BeamRunnerResource, CaptionerResource, LLMEngineResource, StorageResource
from curation.shards import read_manifest
from tests.assets.helpers import add_builds, stage_resources


def _failure_message(result) -> str:
    events = [e for e in result.all_events if e.is_failure]
    return "\n".join(str(e.event_specific_data.error) for e in events if hasattr(e.event_specific_data, "error"))


@pytest.mark.parametrize("overrides, field", [
    ({"llm": LLMEngineResource(engine="gpt-nonsense")}, "LLMEngineResource.engine"),
    ({"llm": LLMEngineResource(model="/no/such/model/dir")}, "LLMEngineResource.model"),
    ({"captioner": CaptionerResource(engine="openai")}, "CaptionerResource.base_url"),
    ({"beam_runner": BeamRunnerResource(runner="NopeRunner")}, "BeamRunnerResource.runner"),
    ({"beam_runner": BeamRunnerResource(launcher="ssh")}, "BeamRunnerResource.launcher"),
])
def test_a_misconfigured_resource_fails_fast_and_writes_nothing(instance, tmp_path, monkeypatch, overrides, field):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    add_builds(instance, "b1")
    result = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                            resources=stage_resources(tmp_path / "root", **overrides),
                            run_config={"ops": {"raw_pairs": {"config": {"demo_pairs": 50}}}})
    assert not result.success
    assert field in _failure_message(result)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*.parquet"))
    assert not result.get_asset_materialization_events()


def test_a_missing_source_fails_naming_the_config_field(instance, tmp_path):
    add_builds(instance, "b1")
    result = dg.materialize(stage_assets, instance=instance, partition_key="b1", raise_on_error=False,
                            selection=["raw_pairs"], resources=stage_resources(tmp_path),
                            run_config={"ops": {"raw_pairs": {"config": {"source": str(tmp_path / "absent")}}}})
    assert not result.success
    assert "IngestRunConfig.source" in _failure_message(result)
    assert not (tmp_path / "b1" / "raw_pairs").exists()


def test_a_remote_root_gets_the_stage_output_with_its_manifest(instance, tmp_path):
    """fsspec's in-memory file system stands in for s3:// or gs://: the same code path as a bucket."""
    add_builds(instance, "b1")
    storage = StorageResource(root="memory://clip-curation-test/builds", staging=str(tmp_path / "staging"))
    result = dg.materialize(stage_assets, instance=instance, partition_key="b1", selection=["raw_pairs"],
                            resources=stage_resources(tmp_path, storage=storage),
                            run_config={"ops": {"raw_pairs": {"config": {"demo_pairs": 60}}}})
    assert result.success
    metadata = result.asset_materializations_for_node("raw_pairs")[0].metadata
    assert metadata["path"].value == "memory://clip-curation-test/builds/b1/raw_pairs"
    fs = fsspec.filesystem("memory")
    local = read_manifest(tmp_path / "staging" / "b1" / "raw_pairs")
    remote = fs.cat_file("/clip-curation-test/builds/b1/raw_pairs/manifest.json")
    assert remote == (tmp_path / "staging" / "b1" / "raw_pairs" / "manifest.json").read_bytes()
    for shard in local["shards"]:
        assert fs.size(f"/clip-curation-test/builds/b1/raw_pairs/{shard['name']}") == shard["bytes"]


def test_an_unknown_storage_protocol_names_the_field():
    with pytest.raises(dg.Failure, match="StorageResource.root"):
        StorageResource(root="nosuchproto://bucket").setup_for_execution(dg.build_init_resource_context())
