"""The code location loads, and every asset, check, schedule, sensor and resource is what the docs say."""

import json
import tomllib
from pathlib import Path

import dagster as dg
import pytest

from assets import checks
from assets.definitions import defs
from assets.resources import BeamRunnerResource
from assets.stages import STAGES, available_stages, builds

REPO = Path(__file__).resolve().parents[2]


def _repo():
    return defs.get_repository_def()


def test_pyproject_points_dagster_at_this_module():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]
    assert tool["module_name"] == "assets.definitions"


def test_every_available_stage_has_its_assets_deps_and_checks():
    graph = _repo().asset_graph
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    check_keys = {(key.asset_key.to_user_string(), key.name) for key in graph.asset_check_keys}
    stages = available_stages()
    assert stages and stages[0].asset == "raw_pairs"
    for stage in stages:
        assert {stage.asset, *stage.extra_assets} <= keys
        node = graph.get(dg.AssetKey(stage.asset))
        assert node.partitions_def == builds
        upstream = {k.to_user_string() for k in node.parent_keys}
        assert upstream == ({stage.upstream} if stage.upstream else set())
        if stage.pair_output:
            expected = {checks.SCHEMA_VALID, checks.CHECKSUMS_MATCH, *([checks.REJECT_RATIO] if stage.rejects else []),
                        *(name for name, _, _ in stage.extra_checks)}
            assert {name for asset, name in check_keys if asset == stage.asset} == expected
    # Nothing beyond the stages' own assets and checks.
    assert keys == {name for s in stages for name in (s.asset, *s.extra_assets)}


def test_blocking_checks_are_blocking():
    graph = _repo().asset_graph
    for key in graph.asset_check_keys:
        spec = graph.get_check_spec(key)
        assert spec.blocking, f"{key} should stop bad data flowing downstream"


def test_gpu_stages_request_gpus_and_share_a_pool():
    assets_by_key = {k.to_user_string(): a for a in defs.assets for k in a.keys}
    for stage in available_stages():
        op = assets_by_key[stage.asset].op
        k8s = json.loads(op.tags["dagster-k8s/config"])
        requests = k8s["container_config"]["resources"]["requests"]
        assert ("nvidia.com/gpu" in requests) == stage.gpu
        assert (op.pool == "gpu") == stage.gpu
        if stage.gpu:
            assert k8s["pod_spec_config"]["node_selector"]


def test_schedule_sensor_job_and_resources_are_defined():
    repo = _repo()
    assert repo.get_schedule_def("weekly_build").cron_schedule == "0 3 * * 1"
    sensor = repo.get_sensor_def("url_list_sensor")
    assert sensor.job_name == "dataset_build"
    job = repo.get_job("dataset_build")
    assert job.partitions_def == builds
    assert set(defs.resources) == {"storage", "beam_runner", "llm", "captioner", "gates"}


def test_every_stage_of_the_pipeline_is_wired():
    """The whole chain, ingest to the trained model: fails while a stage module is missing from the checkout."""
    missing = [s.module for s in STAGES if s not in available_stages()]
    assert not missing, f"stage modules not importable yet: {missing}"


def test_runner_flags_carry_shared_and_per_stage_options():
    beam = BeamRunnerResource(runner="DataflowRunner", options={"region": "eu", "machine_type": "n2"},
                              stage_options={"rewrite": {"machine_type": "g2-standard-8"}})
    assert "--machine_type=n2" in beam.flags("balance")
    assert "--machine_type=g2-standard-8" in beam.flags("rewrite")
    assert "--machine_type=n2" not in beam.flags("rewrite")
    assert beam.effective_launcher() == "subprocess"
    assert BeamRunnerResource().effective_launcher() == "in_process"


def test_a_malformed_launchpad_default_names_its_variable(monkeypatch):
    """Read while the code location loads: a bare int() error named no variable, and the UI showed only that."""
    from assets.config import env_default

    monkeypatch.setenv("CLIP_CURATION_TRAIN_STEPS", "200steps")
    with pytest.raises(ValueError, match=r"\$CLIP_CURATION_TRAIN_STEPS='200steps' is not a valid int"):
        env_default("CLIP_CURATION_TRAIN_STEPS", None)
    monkeypatch.setenv("CLIP_CURATION_FUSED_RATIO", " 0.25 ")
    assert env_default("CLIP_CURATION_FUSED_RATIO", None, float) == 0.25
    monkeypatch.setenv("CLIP_CURATION_FUSED_RATIO", " ")
    assert env_default("CLIP_CURATION_FUSED_RATIO", 0.5, float) == 0.5
