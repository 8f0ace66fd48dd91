"""`clip-curation demo`: the whole pipeline on the embedded demo data, end to end.

Each stage module defines `demo_flags(workdir) -> list[str]` with the flags
that make it demo-sized; the demo chains the stages, feeding each the
previous stage's output. A `--stages` subset feeds its first stage the
finished output (from an earlier demo run) of the nearest stage before it,
else the pool, and each later one the output of the stage it ran before it.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from curation.demo_data import generate
from curation.shards import is_complete
from pipelines.common import StageConfigMismatch
from training.config import RunMismatch

# (stage, module, output directory name), in data-flow order.
STEPS: tuple[tuple[str, str, str], ...] = (
    ("ingest", "pipelines.ingest", "raw_pairs"),
    ("balance", "pipelines.balance", "balanced_pairs"),
    ("rewrite", "pipelines.rewrite", "rewritten_pairs"),
    ("caption", "pipelines.caption", "captioned_pairs"),
    ("export", "pipelines.export", "training_shards"),
    ("train", "training.cli", "clip_model"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clip-curation demo", description=__doc__)
    parser.add_argument("--workdir", required=True, type=Path, help="Where the demo data and every stage's output go.")
    parser.add_argument("--pairs", type=int, default=3000, help="Pairs in the generated pool.")
    parser.add_argument("--eval", type=int, default=500, help="Labelled held-out images.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(s for s, _, _ in STEPS),
                        help="Comma-separated stages to run (default: all); the first reads the finished "
                             "output of the nearest stage before it, else the generated pool, and each later "
                             "one the output of the stage run before it.")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - {stage for stage, _, _ in STEPS}
    if unknown:
        parser.error(f"unknown stage(s) in --stages: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir: Path = args.workdir
    data = workdir / "demo"
    if not (data / "classes.json").is_file():
        print(f"[demo] generating {args.pairs} pairs and {args.eval} eval images in {data}")
        counts = generate(data, n_pairs=args.pairs, n_eval=args.eval, seed=args.seed)
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        print(f"[demo] head concepts: {ranked[:3]}; tail: {ranked[-3:]}")
    wanted = set(args.stages.split(","))
    current = data / "pool"
    ran = False
    for stage, module_name, out_name in STEPS:
        output = workdir / out_name
        if stage not in wanted:
            # A stage left out before this run's first: the next reads what an earlier run made. After one
            # has run, a left-out stage's output is of the data before it, and is passed over.
            if not ran and is_complete(output):
                current = output
            continue
        ran = True
        module = importlib.import_module(module_name)
        flags = ["--input", str(current), "--output", str(output), "--seed", str(args.seed), *module.demo_flags(workdir)]
        start = time.perf_counter()
        print(f"[demo] {stage}: {' '.join(flags)}")
        try:
            module.main(flags)
        except (StageConfigMismatch, RunMismatch) as exc:  # the demo's own output, of other data or version
            print(f"[demo] {stage}: {exc}; redoing it")
            module.main([*flags, "--overwrite"])
        print(f"[demo] {stage} took {time.perf_counter() - start:.1f}s")
        current = output
    print(f"[demo] done: outputs under {workdir}")


if __name__ == "__main__":
    main()
