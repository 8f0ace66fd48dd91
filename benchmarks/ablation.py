"""Does curation help? The same tiny CLIP, the same steps, on raw / balanced / balanced+rewrites / balanced+rewrites+VeC(ap) demo shards.

    python benchmarks/ablation.py [--pairs 2000] [--steps 150] [--train_seeds 3] [--workdir DIR] [--fusion]

Builds the demo data, runs ingest and then whichever of balance, rewrite and
caption exist (each through its `run(argv)` with its own `demo_flags`), trains
`--train_seeds` models per dataset with identical settings (the seeds differ, the data does not: on a
tiny run the spread between seeds is as large as some of the differences), and prints held-out
zero-shot accuracy (100 "colour shape" classes, plus colour-only and
shape-only) and retrieval Recall@k for each. Every score in the table is on the
labelled eval split, one gallery for every row: Recall@k falls as the gallery
grows, and each dataset's own shard holdout (a share of its keys) is larger
for raw than for balanced, so its retrieval would rank rows by dataset size.
The holdout gallery sizes are printed under the table, its scores are left out.

Captions from a random-weight VLM (the caption stage's demo flags build one:
no real model is available offline) are word salad, so a row trained on them
is labelled "(random VLM)" and the footer says it is no VeCLIP ablation.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from curation.demo_data import generate  # noqa: E402
from curation.shards import read_manifest  # noqa: E402
from pipelines import ingest  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.loop import train  # noqa: E402
from training.shard_set import has_values  # noqa: E402

COLUMNS = ("zeroshot_top1", "zeroshot_top5", "zeroshot_colour_acc", "zeroshot_shape_acc", "eval_i2t_r@1",
           "eval_i2t_r@10", "eval_t2i_r@1", "eval_t2i_r@10", "final_loss")
HEADERS = ("top1", "top5", "colour", "shape", "evI2T@1", "evI2T@10", "evT2I@1", "evT2I@10", "loss")
RANDOM_VLM = "(random VLM)"


def run_stage(module_name: str, source: Path, output: Path, workdir: Path, seed: int,
              fusion: bool = False) -> Path | None:
    """Run pipelines.<stage> on `source` if that stage exists; None when it does not. `fusion` turns the
    caption stage's VeCap fusion back on (its demo flags leave it off: SmolLM2 takes seconds per row on CPU)."""
    if importlib.util.find_spec(module_name) is None:
        print(f"[ablation] {module_name}: not available, skipped")
        return None
    module = importlib.import_module(module_name)
    flags = ["--input", str(source), "--output", str(output), "--seed", str(seed)]
    flags += module.demo_flags(workdir) if hasattr(module, "demo_flags") else []
    if fusion:
        flags = [f for f in flags if f != "--no_fusion"]
    start = time.perf_counter()
    module.run(flags)
    print(f"[ablation] {module_name}: {read_manifest(output)['rows']} rows in {time.perf_counter() - start:.0f}s")
    return output


def captioned_by_random_vlm(dataset: Path) -> bool:
    """Whether the caption stage that wrote `dataset` recorded a random-weight tiny captioner."""
    return bool(read_manifest(dataset)["stats"].get("captioner_is_random_tiny_model"))


def footer(results: dict[str, list[dict]]) -> list[str]:
    """Lines under the table: the one retrieval gallery, the per-dataset holdout sizes (why they are not
    compared), and a warning for rows trained on a random VLM's captions."""
    first = next(iter(results.values()))[0]
    holdout = ", ".join(f"{name} {runs[0].get('holdout_pairs', 0)}" for name, runs in results.items())
    lines = [f"ev*: retrieval on the labelled eval split, {first.get('eval_pairs', 0)} pairs, the same gallery for "
             f"every row. Each dataset's own shard holdout (pairs: {holdout}) is not compared: a larger gallery "
             f"lowers Recall@k whatever the data."]
    random_rows = [name for name in results if name.endswith(RANDOM_VLM)]
    if random_rows:
        lines.append(f"WARNING: {', '.join(random_rows)} trained on captions from a tiny VLM with RANDOM weights "
                     f"(caption manifest: captioner_is_random_tiny_model): word salad in half the texts, so the "
                     f"row measures caption noise, not VeCLIP; a VeCLIP ablation needs the caption stage run with a "
                     f"real --captioner_model.")
    return lines


def cell(values: list[float]) -> str:
    """Mean and sample standard deviation over training seeds, 13 characters wide."""
    mean = statistics.fmean(values)
    spread = f"+-{statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{mean:.3f}{spread}".rjust(13)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train_seeds", type=int, default=3,
                        help="models per dataset, seeds seed..seed+N-1 (same data): the table shows mean and spread")
    parser.add_argument("--skip", default="", help="comma-separated stages not to run (balance,rewrite,caption)")
    parser.add_argument("--fusion", action="store_true",
                        help="fuse alt-text and VeC into VeCaps with the default text LLM (slow on CPU): a +VeCap row")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        demo = workdir / "demo"
        if not (demo / "classes.json").is_file():
            generate(demo, n_pairs=args.pairs, n_eval=args.eval, seed=args.seed)
        raw = workdir / "raw_pairs"
        if not (raw / "manifest.json").is_file():
            ingest.run(["--input", str(demo / "pool"), "--output", str(raw), "--seed", str(args.seed)])
        datasets: dict[str, tuple[Path, dict]] = {"raw": (raw, {})}
        ran = ["ingest"]
        balanced = None if "balance" in skip else run_stage("pipelines.balance", raw, workdir / "balanced_pairs",
                                                            workdir, args.seed)
        if balanced:
            ran.append("balance")
            datasets["balanced"] = (balanced, {})
        current = balanced or raw
        for stage, out_name in (("rewrite", "rewritten_pairs"), ("caption", "captioned_pairs")):
            if stage in skip:
                print(f"[ablation] {stage}: skipped by --skip")
                continue
            done = run_stage(f"pipelines.{stage}", current, workdir / out_name, workdir, args.seed,
                             fusion=args.fusion and stage == "caption")
            if done:
                ran.append(stage)
                current = done
                if stage == "rewrite" and has_values(done, "rewrites"):
                    # Its own row too, so that the rewrites' effect is not mixed with the captioner's.
                    datasets[("balanced" if balanced else "raw") + "+rewrites"] = (done, {})
        if current.name == "captioned_pairs":
            # The texts the later stages added, each used as its paper does: rewrites uniformly with the
            # alt-text (LaCLIP), fused captions half the time (VeCLIP); without fusion, the VLM caption half the time.
            parts, extra = ["balanced" if balanced else "raw"], {}
            if has_values(current, "rewrites"):
                parts.append("rewrites")
            if has_values(current, "fused_caption"):
                parts.append("VeCap")
                extra["fused_ratio"] = 0.5
            elif has_values(current, "synthetic_caption"):
                parts.append("VeC")
                extra["synthetic_ratio"] = 0.5
            if len(parts) > 1:
                name = "+".join(parts)
                if parts[-1] in ("VeC", "VeCap") and captioned_by_random_vlm(current):
                    name += RANDOM_VLM
                datasets[name] = (current, extra)
            else:
                print(f"[ablation] {current.name} holds no rewrites or captions: no third row")
        results: dict[str, list[dict]] = {}
        for name, (source, extra) in datasets.items():
            for train_seed in range(args.seed, args.seed + args.train_seeds):
                config = TrainConfig(input=str(source), output=str(workdir / "models" / f"{name}-seed{train_seed}"),
                                     seed=train_seed, preset="tiny", image_size=args.image_size, steps=args.steps,
                                     batch_size=args.batch_size, lr=2e-3, warmup_steps=max(args.steps // 10, 1),
                                     weight_decay=0.1, workers=1, threads=args.threads, progress=False,
                                     overwrite=True, eval=str(demo / "eval"), classes=str(demo / "classes.json"),
                                     **extra)
                start = time.perf_counter()
                results.setdefault(name, []).append(train(config).metrics)
                rows = read_manifest(source)["rows"]
                print(f"[ablation] trained on {name} ({rows} rows), seed {train_seed}, "
                      f"in {time.perf_counter() - start:.0f}s")
        print(f"\nstages run: {', '.join(ran)}; tiny CLIP, {args.steps} steps x batch {args.batch_size}, "
              f"{args.image_size}px, data seed {args.seed}, {args.train_seeds} training seeds (mean, and +- the "
              f"spread between seeds); zero-shot on {args.eval} held-out images, 100 classes "
              f"(chance 0.010; colour and shape chance 0.100)")
        width = max(len(n) for n in results) + 2
        print("dataset".ljust(width) + "".join(h.rjust(13) for h in HEADERS))
        for name, runs in results.items():
            print(name.ljust(width) + "".join(cell([m.get(c, float("nan")) for m in runs]) for c in COLUMNS))
        print("\n".join(footer(results)))
        if args.workdir:
            (workdir / "ablation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
