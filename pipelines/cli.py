"""`clip-curation`: one subcommand per stage, each forwarding its flags to that stage's `main(argv)`.

The CLI and Dagster are two doors into one room: both call the same
`pipelines.<stage>.run`. Stage modules are imported only when their
subcommand runs, so `clip-curation ingest` never loads torch or a model.
"""

from __future__ import annotations

import importlib
import sys

STAGES: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "Generate the demo data and run every available stage on it."),
    "ingest": ("pipelines.ingest", "Raw rows or URL lists to canonical pair shards, with rejects."),
    "balance": ("pipelines.balance", "MetaCLIP metadata matching and balanced sampling."),
    "rewrite": ("pipelines.rewrite", "LaCLIP: k LLM rewrites per caption."),
    "caption": ("pipelines.caption", "VeCLIP/ALIP synthetic captions and fusion."),
    "export": ("pipelines.export", "Training shards, manifest and data card."),
    "train": ("training.cli", "Train the bundled CLIP model on exported shards."),
}


def usage() -> str:
    lines = ["usage: clip-curation <stage> [flags]   (clip-curation <stage> --help for its flags)", "", "stages:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"clip-curation: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if argv is None:
        # Beam's options classes parse with argparse's default prog, sys.argv[0]: this way the usage line
        # of `clip-curation balance --help` names the stage, as demo's and train's own parsers do.
        sys.argv[0] = f"clip-curation {stage}"
    importlib.import_module(STAGES[stage][0]).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
