"""Run config of each stage, editable in the launchpad; each class maps itself to the stage's CLI flags.

The stage's own config dataclass (in `curation/<stage>.py`) stays the one
place a default lives: a field left at `None` here passes no flag, so the
stage's default applies.
"""

import os
from typing import Optional

import dagster as dg
from pydantic import Field

DEMO_SOURCE = "demo"


def env_default(name: str, fallback, kind=int):
    """A launchpad default a deployment may change through the environment of its code location."""
    value = os.environ.get(name, "")
    if not value.strip():
        return fallback
    try:
        return kind(value)
    except ValueError:  # raised while the code location loads: say which variable, not just the literal
        raise ValueError(f"${name}={value!r} is not a valid {kind.__name__}; fix or unset it") from None


class StageConfig(dg.Config):
    """What every stage takes."""

    seed: int = Field(default=0, description="Seed of every random choice (hashed with each row's key).")
    demo_sized: Optional[bool] = Field(
        default=None, description="Add the stage's demo_flags (tiny models, small batches). "
                                  "Empty: yes for a build made from the demo source, no otherwise.")
    overwrite: bool = Field(default=False, description="Replace this build's previous output of the stage "
                                                       "instead of resuming from its finished shards.")
    extra_flags: list[str] = Field(default=[], description="More stage flags, passed as given.")

    def stage_flags(self) -> list[str]:
        """Flags specific to the stage; subclasses add theirs."""
        return []


def _opt(flag: str, value) -> list[str]:
    return [] if value is None else [f"--{flag}={value}"]


DEMO_PAIRS_DEFAULT = env_default("CLIP_CURATION_DEMO_PAIRS", 3000)
DEMO_SHARD_ROWS_DEFAULT = 500


class IngestRunConfig(StageConfig):
    """Empty fields mean the build's own source (assets/build_source.py): a new build's is the demo."""

    source: Optional[str] = Field(default=None, description="Raw Parquet shards directory, a URL list, or 'demo'. "
                                                            "Empty: the build's own; a new build: 'demo'.")
    demo_pairs: Optional[int] = Field(default=None, gt=0, description=(
        f"Pairs generated when source is 'demo'. Empty: the build's own; a new build: $CLIP_CURATION_DEMO_PAIRS "
        f"or 3000 (now {DEMO_PAIRS_DEFAULT})."))
    demo_shard_rows: Optional[int] = Field(default=None, gt=0, description=(
        f"Rows per raw shard of the generated demo pool. Empty: the build's own; a new build: "
        f"{DEMO_SHARD_ROWS_DEFAULT}."))


class BalanceRunConfig(StageConfig):
    t: Optional[float] = Field(default=None, description="Per-entry cap t of MetaCLIP balancing (stage default: 20000).")
    metadata: Optional[str] = Field(default=None, description="MetaCLIP metadata.json; empty: the stage's default.")
    metaclip2_padding: bool = Field(default=False, description="MetaCLIP 2's entry padding, for worldwide metadata: "
                                    "entries match inside Chinese, Japanese, Thai, ... text written without spaces.")

    def stage_flags(self) -> list[str]:
        return _opt("t", self.t) + _opt("metadata", self.metadata) + (
            ["--metaclip2_padding"] if self.metaclip2_padding else [])


class RewriteRunConfig(StageConfig):
    rewrites: Optional[int] = Field(default=None, description="k: rewrites generated per caption (LaCLIP).")

    def stage_flags(self) -> list[str]:
        return _opt("rewrites_per_caption", self.rewrites)


class CaptionRunConfig(StageConfig):
    fusion_temperature: Optional[float] = Field(
        default=None, description="Sampling temperature of VeCLIP fusion: low, so the VeCap keeps the facts of "
                                  "both captions (the llm resource's temperature is the rewrites', which want "
                                  "variety). Empty: the stage's default.")

    def stage_flags(self) -> list[str]:
        return _opt("fusion_temperature", self.fusion_temperature)


class ExportRunConfig(StageConfig):
    pass


class TrainRunConfig(StageConfig):
    steps: Optional[int] = Field(default=env_default("CLIP_CURATION_TRAIN_STEPS", None),
                                 description="Optimiser steps; empty: $CLIP_CURATION_TRAIN_STEPS or the trainer's "
                                             "(demo-sized: the demo's).")
    preset: Optional[str] = Field(default=None, description="Model preset: tiny, vit-b-32 or vit-b-16.")
    fused_ratio: Optional[float] = Field(
        default=env_default("CLIP_CURATION_FUSED_RATIO", None, float),
        description="Share of visits that train on the fused caption (VeCLIP); empty: "
                    "$CLIP_CURATION_FUSED_RATIO or the trainer's (demo-sized: the demo's).")

    batch_size: Optional[int] = Field(default=env_default("CLIP_CURATION_TRAIN_BATCH", None),
                                      description="Pairs per step; empty: $CLIP_CURATION_TRAIN_BATCH or the trainer's.")

    def stage_flags(self) -> list[str]:
        # The trainer checks its input's sha256s, and only when it has steps left to run: a rerun of a trained
        # build then hashes no byte of the export. First, so that extra_flags' --no-verify_checksums wins.
        return (["--verify_checksums"] + _opt("steps", self.steps) + _opt("preset", self.preset)
                + _opt("fused_ratio", self.fused_ratio) + _opt("batch_size", self.batch_size))
