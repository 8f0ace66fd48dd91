"""`clip-curation train`: train the bundled CLIP model on exported shards.

    clip-curation train --input work/demo/training_shards --output work/demo/clip_model \\
        --eval work/demo/demo/eval --steps 300 [--fused_ratio 0.5] [--online_curation]

Multi-GPU: `torchrun --nproc_per_node 8 -m training.cli --input ... --output ...`.
`run(argv)` is what the Dagster asset calls; `main(argv)` prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training.config import argparse_flags, config_from_args
from training.loop import TrainResult, train
from training.shard_set import has_values

# The demo chain's outputs, most processed first: the first that exists is what train reads.
DEMO_INPUTS = ("training_shards", "captioned_pairs", "rewritten_pairs", "balanced_pairs", "raw_pairs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clip-curation train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    argparse_flags(parser)
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> TrainResult:
    return train(config_from_args(parse_args(argv)))


def demo_flags(workdir: Path) -> list[str]:
    """Demo-sized training: the tiny model for a few minutes on CPU, scored on the demo's labelled split.

    Fused captions join the mix half the time (VeCLIP) when the caption stage has produced them. No
    `--overwrite`: a retried or repeated run resumes from its checkpoints like every other stage.
    """
    workdir = Path(workdir)
    flags = ["--preset", "tiny", "--image_size", "32", "--steps", "200", "--batch_size", "64", "--warmup_steps", "20",
             "--lr", "2e-3", "--weight_decay", "0.1", "--eval", str(workdir / "demo" / "eval"),
             "--classes", str(workdir / "demo" / "classes.json"), "--eval_every", "50"]
    newest = next((workdir / name for name in DEMO_INPUTS if (workdir / name).is_dir()), None)
    if newest is not None and has_values(newest, "fused_caption"):
        flags += ["--fused_ratio", "0.5"]
    return flags


def summary(result: TrainResult) -> str:
    if result.stopped_early:
        return f"[train] stopped after step {result.steps} as asked; checkpoint {result.checkpoint}"
    m = result.metrics
    parts = [f"[train] {result.steps} steps in {m.get('seconds', 0):.0f}s -> {result.output}",
             f"loss {m.get('first_loss') or float('nan'):.3f} -> {m.get('final_loss') or float('nan'):.3f}"]
    if "zeroshot_top1" in m:
        parts.append(f"zero-shot top1 {m['zeroshot_top1']:.3f} (chance {m['zeroshot_chance']:.3f}), "
                     f"top5 {m['zeroshot_top5']:.3f}")
    if "holdout_i2t_r@1" in m:
        parts.append(f"holdout R@1 i2t {m['holdout_i2t_r@1']:.3f} t2i {m['holdout_t2i_r@1']:.3f} "
                     f"({m['holdout_pairs']} pairs)")
    skipped = {k: m[k] for k in ("corrupt_images", "curated_out", "truncated_texts", "bad_steps") if m.get(k)}
    if skipped:
        parts.append("counted: " + json.dumps(skipped))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    result = run(argv)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(summary(result))


if __name__ == "__main__":
    main(sys.argv[1:])
