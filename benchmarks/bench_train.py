"""Training throughput: the trainer's own step on synthetic tensors, on real Parquet shards, and against open_clip.

    python benchmarks/bench_train.py                  # CUDA: ViT-B/32, batch 256, bf16; CPU: tiny, batch 64
    python benchmarks/bench_train.py --compile        # also the towers through torch.compile
    python benchmarks/bench_train.py --input DIR      # read these shards instead of generating demo ones

Every figure times `training.step.TrainStep`, the step `training/loop.py`
runs (device-side normalisation, symmetric InfoNCE, clipping at 1.0, the
warmup-cosine schedule, the logit-scale clamp, bad-step gating), with the
same optimizer on every compared row: AdamW, fused on CUDA. Synthetic
batches are uint8 images and token ids already on the device, the same
tensors for both models. Rows:
1. the trainer's CLIPModel, synthetic tensors (eager; with --compile, then compiled);
2. the fastest of those fed by the Parquet loader (decode, crop, tokenize in
   workers; uint8 pinned batches): Parquet / synthetic says whether the loader
   is the bottleneck (target >= 0.9);
3. the eager step with Stable-SPAM (the trainer's default optimizer), for reference;
4. open_clip's ViT-B-32 (CUDA, when importable), eager, through the same step,
   timed right after the eager row: trainer / open_clip is the speed target (>= 1.3),
   printed for each trainer row;
5. the eager step with `--quantize int4` (Stable-SPAM's 4-bit training: weights and
   activations fake-quantized in the forward pass), same AdamW: its cost against row 1.
The demo shards are written without the pipeline (`training.demo_shards`),
sized so that each loader worker gets several batches per epoch. Nothing
here needs Beam or Dagster.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from training.config import TrainConfig  # noqa: E402
from training.data import LoaderState, StreamSpec, train_batches  # noqa: E402
from training.demo_shards import write_demo_pairs  # noqa: E402
from training.model import PRESETS, ClipTowers, build_model, clip_config  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.optimization import make_optimizer, param_groups, warmup_cosine  # noqa: E402
from training.shard_set import inspect_shards, iter_texts  # noqa: E402
from training.step import TrainStep  # noqa: E402
from training.tokenizer import train_bpe  # noqa: E402

BATCHES_PER_WORKER = 4  # demo epoch size: this many batches for every loader worker
OPEN_CLIP_WHEELS = "open_clip_torch 3.3.0 with ftfy and wcwidth (torch, torchvision, timm, regex are there)"


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b-32" if cuda else "tiny")
    parser.add_argument("--batch", type=int, default=256 if cuda else 64)
    parser.add_argument("--steps", type=int, default=30 if cuda else 8)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument("--workers", type=int, default=8 if cuda else 1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trainer's towers")
    parser.add_argument("--input", help="shards to read; default: demo shards generated into a temp dir")
    parser.add_argument("--pairs", type=int, default=0,
                        help=f"demo pairs to generate (0: {BATCHES_PER_WORKER} batches per loader worker)")
    return parser.parse_args()


def demo_shards(root: Path, pairs: int, workers: int) -> Path:
    """Demo pair shards with at least two row groups (units) per worker, so every worker reads several."""
    units = max(2 * max(workers, 1), 4)
    rows_per_unit = max(pairs // units, 1)
    return write_demo_pairs(root, pairs, rows_per_shard=2 * rows_per_unit, row_group_rows=rows_per_unit)


def timed(step: Callable[[], int], steps: int, warmup: int, device: torch.device) -> float:
    """Samples per second over `steps` steps after `warmup` untimed ones (data loading included)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        samples += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The comparison's optimizer on every side: AdamW with the trainer's groups and betas, fused on CUDA."""
    defaults = TrainConfig(optimizer="adamw")
    return build_optimizer("adamw", param_groups(model, defaults.weight_decay), lr=defaults.lr,
                           betas=(defaults.beta1, defaults.beta2), eps=defaults.eps, weight_decay=defaults.weight_decay,
                           fused=device.type == "cuda")


def make_step(towers: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
              steps: int) -> TrainStep:
    defaults = TrainConfig()
    return TrainStep(towers, model, optimizer, warmup_cosine(optimizer, defaults.warmup_steps, steps), device=device,
                     grad_clip=defaults.grad_clip, precision="bf16" if device.type == "cuda" else "fp32")


def trainer_model(preset_name: str, vocab: int, eos: int, device: torch.device,
                  compiled: bool, quantize: str = "none") -> tuple[nn.Module, nn.Module]:
    """(towers, model): the trainer's CLIPModel for the preset, its towers compiled if asked (as --compile does),
    4-bit if asked (as --quantize does)."""
    preset = PRESETS[preset_name]
    config = clip_config(preset_name, vocab_size=vocab, bos_token_id=0, eos_token_id=eos, pad_token_id=eos,
                         image_size=preset.image_size, context_length=preset.context_length)
    model = build_model(config, seed=0, quantize=quantize).to(device)
    towers = ClipTowers(model)
    return (torch.compile(towers) if compiled else towers), model


def synthetic(batch: int, image_size: int, context: int, vocab: int, eos: int, device: torch.device) -> Callable:
    """A fetch that returns the same device-resident batch: uint8 pixels, ids ending in the end token."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, context), generator=generator)
    ids[:, -1] = eos
    fixed = {"pixel_values": torch.randint(0, 256, (batch, 3, image_size, image_size), generator=generator,
                                           dtype=torch.uint8).to(device),
             "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return lambda: fixed


class OpenClipTowers(nn.Module):
    """open_clip's CLIP behind the towers' signature: (pixels, ids, mask) -> (image, text, logit scale)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        image, text, scale = self.model(pixel_values, input_ids)[:3]
        return image.float(), text.float(), scale.float()


def open_clip_rate(args, fetch: Callable, device: torch.device) -> float | None:
    """open_clip ViT-B-32 through the same step and optimizer, or None (with the reason printed)."""
    if device.type != "cuda" or args.preset != "vit-b-32":
        print("open_clip: the comparison is ViT-B-32 on CUDA, skipped")
        return None
    try:
        import open_clip
    except Exception as exc:  # ImportError, or a torchvision that does not match torch
        print(f"open_clip: not importable ({type(exc).__name__}: {exc}), skipped; it needs {OPEN_CLIP_WHEELS}")
        return None
    try:
        model = open_clip.create_model("ViT-B-32").to(device)
    except Exception as exc:
        print(f"open_clip: ViT-B-32 could not be built ({type(exc).__name__}: {exc}), skipped")
        return None
    step = make_step(OpenClipTowers(model), model, adamw(model, device), device, args.steps + args.warmup)
    return timed(lambda: step(fetch), args.steps, args.warmup, device)


def row(label: str, value: float, unit: str = "samples/s", note: str = "") -> None:
    print(f"{label:40}: {value:9.{2 if unit == 'x' else 1}f} {unit}{f'  ({note})' if note else ''}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset]
    total = args.steps + args.warmup
    print(f"device {device}, preset {args.preset}, batch {args.batch}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, compile {args.compile}, "
          f"AdamW{' (fused)' if device.type == 'cuda' else ''} unless noted")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = args.pairs or BATCHES_PER_WORKER * args.batch * max(args.workers, 1)
        source = Path(args.input) if args.input else demo_shards(Path(tmp), pairs, args.workers)
        shards = inspect_shards(source)
        tokenizer = train_bpe(iter_texts(shards, 0.0), preset.vocab_size, preset.context_length)
        # The preset's vocabulary whatever the demo BPE learnt: the embedding table and the optimizer's
        # work are then those of a real ViT-B/32 (and of open_clip's).
        vocab, eos = max(preset.vocab_size, len(tokenizer)), tokenizer.eos_token_id
        fetch = synthetic(args.batch, preset.image_size, preset.context_length, vocab, eos, device)

        # open_clip right after the eager row, before the compiled one: a compile that runs out the section's
        # time limit on the GPU machine then still leaves the comparison printed.
        rates, steps, reference = {}, {}, None
        for compiled in (False, True) if args.compile else (False,):
            towers, model = trainer_model(args.preset, vocab, eos, device, compiled)
            name = "compiled" if compiled else "eager"
            steps[name] = make_step(towers, model, adamw(model, device), device, 2 * total)
            rates[name] = timed(lambda: steps[name](fetch), args.steps, args.warmup, device)
            row(f"trainer {name}, synthetic tensors", rates[name])
            if not compiled:
                reference = open_clip_rate(args, fetch, device)
                if reference:
                    row("open_clip ViT-B-32 eager, synthetic", reference, note="same step, same AdamW")
            if reference:
                row(f"ratio trainer {name} / open_clip", rates[name] / reference, "x", "target >= 1.3")
        best = max(rates, key=rates.get)
        spec = StreamSpec(shards, 0, preset.image_size, preset.context_length, shuffle_buffer=256)
        batches = train_batches(spec, tokenizer, LoaderState(), workers=args.workers, batch_size=args.batch,
                                pin_memory=device.type == "cuda")
        try:
            parquet_rate = timed(lambda: steps[best](lambda: next(batches)), args.steps, args.warmup, device)
        finally:
            batches.close()
        row(f"trainer {best}, Parquet shards", parquet_rate,
            note=f"{args.workers} loader workers, {shards.rows} rows in {len(shards.units)} row groups")
        row("ratio Parquet / synthetic", parquet_rate / rates[best], "x", "target >= 0.9")
        for name, step in steps.items():
            report = step.health.read()
            if report.bad_total:
                print(f"warning: {report.bad_total} of the {name} step's {report.step} steps had a non-finite loss")
        del steps
        towers, model = trainer_model(args.preset, vocab, eos, device, compiled=False)
        spam = make_step(towers, model, make_optimizer(model, TrainConfig()), device, total)
        row("trainer eager, Stable-SPAM, synthetic", timed(lambda: spam(fetch), args.steps, args.warmup, device),
            note="the trainer's default optimizer; not part of the comparison")
        del towers, model, spam
        towers, model = trainer_model(args.preset, vocab, eos, device, compiled=False, quantize="int4")
        four_bit = make_step(towers, model, adamw(model, device), device, total)
        rate = timed(lambda: four_bit(fetch), args.steps, args.warmup, device)
        row("trainer eager, --quantize int4, synthetic", rate, note="INT4 weights and activations, same AdamW")
        row("ratio int4 / full precision (eager)", rate / rates["eager"], "x")
        del towers, model, four_bit
    if device.type != "cuda":
        print("no CUDA: GPU figures (ViT-B/32 batch 256 bf16, open_clip comparison) not measured")


if __name__ == "__main__":
    main()
