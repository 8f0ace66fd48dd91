"""Choosing the Beam runner and reporting a stage's outcome, the same way for every stage."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

DEFAULT_RUNNER = "DirectRunner"  # Prism's binary cannot be downloaded on offline machines.

# Beam warns about every stage flag it does not know when it makes a view of the options; they are ours.
logging.getLogger("apache_beam.options.pipeline_options").setLevel(logging.ERROR)


@dataclass
class StageResult:
    """What `run()` returns: the manifest it wrote (or kept, when the output was already up to date) and where."""

    manifest: dict
    output: Path
    up_to_date: bool = False

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    @property
    def rejects(self) -> dict[str, int]:
        return self.manifest.get("rejects", {}).get("by_reason", {})


def refuse_unknown_flags(argv: list[str] | None, options: type[PipelineOptions]) -> None:
    """Raise on a flag that neither the stage's `options` class (and its bases) nor Beam defines. Why: Beam
    keeps a flag it does not know and only logs it (which this module silences), so a misspelt
    --rewrite_modle ran the default model; another stage's flag would be as silently ignored."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    parser = beam_parser(options)
    known = {flag for action in parser._actions for flag in action.option_strings}
    flags = [arg.split("=", 1)[0] for arg in args if arg.startswith("--") and arg != "--"]
    unknown = [flag for flag in flags if flag not in known]
    if unknown:
        raise ValueError(f"unknown flag(s) {', '.join(unknown)}; see --help for this stage's flags")


def beam_parser(options: type[PipelineOptions] = PipelineOptions) -> argparse.ArgumentParser:
    """One parser of every flag Beam's options classes define, plus `options`' own (and its bases'). It
    raises argparse.ArgumentError on a value it refuses instead of exiting the process as Beam's does."""
    # No abbreviations: --machine_typ is no --machine_type, as refuse_unknown_flags (exact names) has it.
    parser = argparse.ArgumentParser(add_help=True, conflict_handler="resolve", exit_on_error=False,
                                     allow_abbrev=False)
    beams = [c for c in _subclasses(PipelineOptions) if c.__module__.startswith("apache_beam.")]
    for cls in {PipelineOptions, *beams, *options.__mro__}:
        if "_add_argparse_args" in vars(cls):
            cls._add_argparse_args(parser)
    return parser


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def pipeline_for(options: PipelineOptions, test_pipeline: beam.Pipeline | None = None) -> beam.Pipeline:
    """The test's pipeline if given, else one on the requested runner (DirectRunner when none is named)."""
    if test_pipeline is not None:
        return test_pipeline
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    return beam.Pipeline(options=options)


def print_summary(result: StageResult) -> None:
    manifest = result.manifest
    rejects = manifest.get("rejects", {})
    print(f"[{manifest['stage']}] {manifest['rows']} rows in {len(manifest['shards'])} shards "
          f"({manifest['bytes'] / 1e6:.1f} MB) -> {result.output}"
          f"{' (up to date: nothing to do; the figures are those of the run that made it)' if result.up_to_date else ''}")
    if rejects.get("rows"):
        print(f"[{manifest['stage']}] rejected {rejects['rows']}: {json.dumps(rejects['by_reason'])}")
    stats = {k: v for k, v in manifest.get("stats", {}).items() if not isinstance(v, (list, dict))}
    if stats:
        print(f"[{manifest['stage']}] " + ", ".join(f"{k}={v}" for k, v in stats.items()))
