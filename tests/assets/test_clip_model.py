"""The clip_model asset: rebuilt from scratch when its training shards change, on the new shards."""

import json
import shutil

import dagster as dg

from assets.definitions import stage_assets
from curation.shards import read_manifest
from tests.assets.helpers import add_builds, stage_resources
from training.checkpoint import latest_checkpoint
from training.demo_shards import write_demo_pairs
from training.metrics_log import MetricsLog
from training.shard_set import input_fingerprint

TRAIN = ["--preset", "tiny", "--image_size", "32", "--context_length", "16", "--vocab_size", "300", "--workers", "0",
         "--threads", "1", "--warmup_steps", "1", "--holdout_fraction", "0.1", "--log_every", "1", "--no-progress"]


def _export(build_dir, scratch, seed: int) -> None:
    """Stand-in training shards for the build (a complete stage output with its manifest), without Beam."""
    made = write_demo_pairs(scratch / f"seed{seed}", 120, rows_per_shard=60, row_group_rows=30, seed=seed)
    target = build_dir / "training_shards"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(made, target)


def _materialize(instance, root):
    config = {"ops": {"clip_model": {"config": {"steps": 3, "batch_size": 8, "extra_flags": TRAIN}}}}
    return dg.materialize(stage_assets, instance=instance, partition_key="b1", selection=["clip_model"],
                          resources=stage_resources(root), run_config=config)


def test_changed_training_shards_retrain_the_model(instance, tmp_path):
    add_builds(instance, "b1")
    root, build = tmp_path / "storage", tmp_path / "storage" / "b1"
    _export(build, tmp_path, seed=0)
    assert _materialize(instance, root).success
    model = build / "clip_model"
    first = json.loads((latest_checkpoint(model) / "state.json").read_text())
    _export(build, tmp_path, seed=1)  # a re-export under the same path
    result = _materialize(instance, root)
    assert result.success  # the step passed --overwrite, which the trainer takes
    state = json.loads((latest_checkpoint(model) / "state.json").read_text())
    assert state["input"] == input_fingerprint(build / "training_shards") != first["input"]
    assert [s for s, _ in MetricsLog.series(model / "metrics.csv", "loss")] == [1, 2, 3]  # started over
    metadata = result.asset_materializations_for_node("clip_model")[0].metadata
    assert metadata["steps"].value == 3
    assert read_manifest(build / "training_shards")["config"]["seed"] == 1
