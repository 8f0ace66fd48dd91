"""Helpers for the Dagster tests: resources rooted in a temp dir, a demo-sized run config, build partitions."""

import dagster as dg

from assets.resources import (
    BeamRunnerResource, CaptionerResource, LLMEngineResource, QualityGatesResource, StorageResource,
)
from assets.stages import available_stages, builds

DEMO_PAIRS = 24
TRAIN_STEPS = 8


def stage_resources(root, **overrides) -> dict:
    """Every resource the stage assets need, with storage under `root`."""
    resources = {
        "storage": StorageResource(root=str(root)),
        "beam_runner": BeamRunnerResource(),
        "llm": LLMEngineResource(),
        "captioner": CaptionerResource(),
        "gates": QualityGatesResource(),
    }
    return {**resources, **overrides}


def demo_run_config(pairs: int = DEMO_PAIRS, **ops) -> dict:
    """Demo-sized config for every available stage: a tiny demo pool, each stage's demo flags, and a few
    training steps (the demo's own training takes minutes on a CPU).

    `fused_ratio=0`: with the demo's random tiny VLM the caption stage skips fusion, so `fused_caption`
    is all null, which the trainer refuses to sample from.
    """
    config = {stage.asset: {"config": {"demo_sized": True}} for stage in available_stages()}
    config["raw_pairs"]["config"]["demo_pairs"] = pairs
    if "clip_model" in config:
        config["clip_model"]["config"].update(steps=TRAIN_STEPS, fused_ratio=0.0, batch_size=8,
                                              extra_flags=["--eval_every", "0"])
    for name, extra in ops.items():
        config[name]["config"].update(extra)
    return {"ops": config}


def add_builds(instance: dg.DagsterInstance, *keys: str) -> None:
    instance.add_dynamic_partitions(builds.name, list(keys))


def failing_reject_ratio(monkeypatch) -> None:
    """Make every stage's reject-ratio check fail, as for an output that rejected too much (the demo pool
    rejects too little to cross any gate QualityGatesResource accepts)."""
    from assets import checks

    real = checks.reject_ratio
    monkeypatch.setattr(checks, "reject_ratio", lambda asset, ratio, threshold, download=None: real(asset, 1.0, 0.0))
