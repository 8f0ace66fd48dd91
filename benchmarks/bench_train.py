"""Training throughput: the trainer's step on synthetic tensors vs on real Parquet shards (and vs open_clip).

    python benchmarks/bench_train.py                  # CUDA: ViT-B/32, batch 256, bf16; CPU: tiny, batch 64
    python benchmarks/bench_train.py --input DIR      # read these shards instead of generating demo ones

Prints samples/s for (1) the trainer's step on synthetic tensors, (2) the
same step fed by the Parquet loader (decode, crop, tokenize in workers), and
(3) open_clip's ViT-B-32 step on the same synthetic batch when open_clip is
importable and CUDA is there. The ratio parquet/synthetic says whether the
loader is the bottleneck (target >= 0.9); trainer/open_clip is the speed target.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from training.config import TrainConfig  # noqa: E402
from training.data import LoaderState, StreamSpec, inspect_shards, iter_texts, train_batches  # noqa: E402
from training.loss import contrastive_loss  # noqa: E402
from training.model import PRESETS, ClipTowers, build_model, clamp_logit_scale, clip_config  # noqa: E402
from training.optimization import make_optimizer  # noqa: E402
from training.tokenizer import train_bpe  # noqa: E402


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b-32" if cuda else "tiny")
    parser.add_argument("--batch", type=int, default=256 if cuda else 64)
    parser.add_argument("--steps", type=int, default=30 if cuda else 8)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument("--workers", type=int, default=8 if cuda else 1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--optimizer", default=TrainConfig().optimizer)
    parser.add_argument("--compile", action="store_true", help="torch.compile the towers (CUDA)")
    parser.add_argument("--input", help="shards to read; default: demo shards generated into a temp dir")
    parser.add_argument("--pairs", type=int, default=3000 if cuda else 600, help="demo pairs to generate")
    return parser.parse_args()


def demo_shards(root: Path, pairs: int) -> Path:
    from curation.demo_data import generate
    from pipelines import ingest

    generate(root / "demo", n_pairs=pairs, n_eval=0, rows_per_shard=max(pairs // 8, 1))
    ingest.run(["--input", str(root / "demo" / "pool"), "--output", str(root / "raw_pairs")])
    return root / "raw_pairs"


def timed(step, batches, steps: int, warmup: int, batch_size: int, device: torch.device) -> float:
    """Samples per second over `steps` steps after `warmup` untimed ones (data loading included)."""
    for _ in range(warmup):
        step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def trainer_step(preset: str, vocab: int, eos: int, device: torch.device, args, image_size: int, context: int):
    config = clip_config(preset, vocab_size=vocab, bos_token_id=0, eos_token_id=eos, pad_token_id=eos,
                         image_size=image_size, context_length=context)
    model = build_model(config, seed=0).to(device)
    towers = torch.compile(ClipTowers(model)) if args.compile else ClipTowers(model)
    optimizer = make_optimizer(model, TrainConfig(optimizer=args.optimizer))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step(batch: dict) -> None:
        with autocast:
            image, text, scale = towers(batch["pixel_values"].to(device, non_blocking=True),
                                        batch["input_ids"].to(device, non_blocking=True),
                                        batch["attention_mask"].to(device, non_blocking=True))
        contrastive_loss(image, text, scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(model)

    return step


def synthetic(batch: int, image_size: int, context: int, vocab: int, eos: int):
    pixels = torch.randn(batch, 3, image_size, image_size)
    ids = torch.randint(3, vocab, (batch, context))
    ids[:, -1] = eos
    fixed = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    while True:
        yield fixed


def open_clip_rate(args, device: torch.device) -> float | None:
    try:
        import open_clip
    except ImportError:
        print("open_clip: not importable, skipped")
        return None
    if device.type != "cuda":
        print("open_clip: needs CUDA for the comparison, skipped")
        return None
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32")
    model = model.to(device)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    pixels = torch.randn(args.batch, 3, 224, 224, device=device)
    ids = torch.randint(0, 49408, (args.batch, 77), device=device)

    def step(_):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            image, text, scale = model(pixels, ids)
        loss_fn(image.float(), text.float(), scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, iter(lambda: None, 1), args.steps, args.warmup, args.batch, device)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset]
    print(f"device {device}, preset {args.preset}, batch {args.batch}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, optimizer {args.optimizer}")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.input) if args.input else demo_shards(Path(tmp), args.pairs)
        shards = inspect_shards(source)
        tokenizer = train_bpe(iter_texts(shards, 0.0), preset.vocab_size, preset.context_length)
        vocab, eos = len(tokenizer), tokenizer.eos_token_id
        step = trainer_step(args.preset, vocab, eos, device, args, preset.image_size, preset.context_length)
        synthetic_rate = timed(step, synthetic(args.batch, preset.image_size, preset.context_length, vocab, eos),
                               args.steps, args.warmup, args.batch, device)
        print(f"trainer, synthetic tensors : {synthetic_rate:9.1f} samples/s")
        spec = StreamSpec(shards, 0, preset.image_size, preset.context_length, shuffle_buffer=256)
        batches = train_batches(spec, tokenizer, LoaderState(), workers=args.workers, batch_size=args.batch,
                                pin_memory=device.type == "cuda")
        parquet_rate = timed(step, batches, args.steps, args.warmup, args.batch, device)
        batches.close()
        print(f"trainer, Parquet shards    : {parquet_rate:9.1f} samples/s  ({args.workers} loader workers)")
        print(f"ratio Parquet / synthetic  : {parquet_rate / synthetic_rate:9.2f}x  (target >= 0.9)")
    reference = open_clip_rate(args, device)
    if reference:
        print(f"open_clip ViT-B-32         : {reference:9.1f} samples/s")
        print(f"ratio trainer / open_clip  : {synthetic_rate / reference:9.2f}x  (target >= 1.3)")
    if device.type != "cuda":
        print("no CUDA: GPU figures (ViT-B/32 batch 256 bf16, open_clip comparison) not measured")


if __name__ == "__main__":
    main()
