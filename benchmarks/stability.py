"""Toy-scale version of the Stable-SPAM paper's claim: in 4-bit (INT4 or FP4 weights and activations), at a
high learning rate, Adam diverges where Stable-SPAM keeps training.

A small Llama-shaped model (transformers LlamaForCausalLM from a config) is trained as a word-level
language model on demo-style alt-text captions (curation.demo_data.alt_text), with every decoder linear
fake-quantized by training.optim.quantize_model (INT4 weights in groups of 256, INT4 activations in
groups of 256 with the top-2 outliers kept, as the reference code ran; `--weight-format`/`--act-format`
choose FP4 instead, the reference code's E1M2 grid or the hardware E2M1 one, and every result row names
the formats it ran with). Each optimizer runs at each
learning rate from the same initial weights and data order (one pair of them per `--seeds`); the script
prints final losses (mean and spread over seeds), how many runs diverged (a non-finite loss, or a final
loss above the loss at the start) and how many spiked (a final loss 1.5x its minimum: blew up, then
settled), and the (tensor, step) updates SPAM and Stable-SPAM skipped for non-finite gradients, which
AdamW would have applied. `adamw_clip` (AdamW after clipping the global gradient norm at 1.0, SPAM's own
baseline) can be added with --optimizers. The learning rate warms up over 10% of the steps, then decays
by cosine to 10% (training.optimization.warmup_cosine).

Defaults: hidden 384, 6 layers (11.4M parameters with the corpus's 1030-word vocabulary), 300 steps.
The paper resets momentum every 500 steps of 20k; so that resets happen within this short run, the
reset interval is scaled to the run (default steps // 3 = 100, both optimizers), SPAM's post-reset
warmup keeps the paper's 150/500 ratio (30 steps), and its clip delay is the paper's 20 steps where that is
under a fifth of the interval, else a fifth (at least 2: the `--quick` run's 13-step interval clipped nothing
with 20). SPAM's ramp also runs from step 0, on top of the LR
warmup, as the spec's warmup after every reset does (SPAM's own code starts past it). On a shared 2-core CPU the default takes ~1.3 s per step, about an hour
for its 9 runs; `--quick` is a 0.5M-parameter smoke run of 40 steps (~10 s).

    python benchmarks/stability.py [--quick] [--steps 300] [--lrs 1e-2 3e-2 1e-1] [--hidden 384 --layers 6]
        [--weight-format fp4_e2m1 --act-format fp4_e2m1]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.demo_data import CONCEPTS, alt_text, concept_weights  # noqa: E402
from training.optim import QuantConfig, build_optimizer, quantize_model  # noqa: E402
from training.optim.quant import ACT_ROUNDING, FORMATS  # noqa: E402
from training.optimization import warmup_cosine  # noqa: E402

OPTIMIZERS = ("adamw", "spam", "stable_spam")
CHOICES = (*OPTIMIZERS, "adamw_clip")


def caption_corpus(n: int, seed: int) -> list[str]:
    """`n` demo-style captions with the demo's Zipf concept mix."""
    rng = random.Random(seed)
    weights = concept_weights(seed)
    return [alt_text(rng.choices(CONCEPTS, weights)[0], rng.randint(1, 4), rng) for _ in range(n)]


def token_stream(captions: list[str]) -> tuple[torch.Tensor, int]:
    """Word-level ids (lower-cased, punctuation split off), one end-of-caption id between captions."""
    words = [caption.lower().replace(",", " ,").replace(".", " .").split() + ["<eos>"] for caption in captions]
    vocab = {w: i for i, w in enumerate(sorted({w for ws in words for w in ws}))}
    return torch.tensor([vocab[w] for ws in words for w in ws]), len(vocab)


def build_model(vocab: int, hidden: int, layers: int, seed: int, quant: QuantConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    quantize_model(model, quant)
    return model


def quant_config(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(weight_format=args.weight_format, act_format=args.act_format, weight_group=args.weight_group,
                       act_group=args.act_group, outliers=args.outliers, act_rounding=args.act_rounding,
                       stochastic_round=args.stochastic_round)


def quant_label(quant: QuantConfig) -> str:
    """The formats a run quantizes with, as its rows print them."""
    return (f"W {quant.weight_format}/g{quant.weight_group}, A {quant.act_format}/g{quant.act_group} "
            f"(top-{quant.outliers} outliers, {quant.act_rounding}{', stochastic' if quant.stochastic_round else ''})")


def train(name: str, lr: float, args: argparse.Namespace, tokens: torch.Tensor, vocab: int, seed: int) -> dict:
    model = build_model(vocab, args.hidden, args.layers, seed, quant_config(args))
    options = {"spam": dict(reset_interval=args.reset_interval, warmup_steps=args.spam_warmup,
                            clip_delay=args.spam_clip_delay),
               "stable_spam": dict(reset_interval=args.reset_interval)}.get(name, {})
    clip = name == "adamw_clip"
    opt = build_optimizer("adamw" if clip else name, model.parameters(), lr=lr, weight_decay=0.0, **options)
    schedule = warmup_cosine(opt, max(1, args.steps // 10), args.steps, final_ratio=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        offsets = torch.randint(0, len(tokens) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([tokens[o: o + args.seq] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"    {name} lr={lr:g} step {step + 1}: loss {losses[-1]:.4f}", flush=True)
    tail = losses[-10:]
    final = sum(tail) / len(tail)
    initial = sum(losses[:10]) / len(losses[:10])
    diverged = not all(math.isfinite(x) for x in losses) or final > initial
    skipped = opt.skipped_steps() if hasattr(opt, "skipped_steps") else 0
    return dict(final=final, initial=initial, min=min(losses), diverged=diverged, spiked=final > 1.5 * min(losses),
                skipped=skipped, steps=len(losses), seconds=time.perf_counter() - start,
                params=sum(p.numel() for p in model.parameters()))


def mean_spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f}" + (f"+-{(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else "")


QUICK = dict(steps=40, lrs=[3e-2], hidden=128, layers=2, batch=8, seq=32, captions=2000, log_every=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small smoke run: {QUICK}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-2, 1e-1])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=CHOICES)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--weight-group", type=int, default=256)
    parser.add_argument("--act-group", type=int, default=256)
    parser.add_argument("--weight-format", choices=FORMATS, default="int4")
    parser.add_argument("--act-format", choices=FORMATS, default="int4")
    parser.add_argument("--outliers", type=int, default=2, help="largest |values| per group kept exact")
    parser.add_argument("--act-rounding", choices=ACT_ROUNDING, default="nearest",
                        help="INT4 activations: nearest (unbiased), or floor as the reference code ran")
    parser.add_argument("--stochastic-round", action="store_true", help="stochastic rounding of INT4 activations")
    parser.add_argument("--reset-interval", type=int, default=None, help="momentum reset period (default steps // 3)")
    parser.add_argument("--spam-warmup", type=int, default=None,
                        help="SPAM's post-reset warmup (default 0.3 x the reset interval, the paper's 150/500)")
    parser.add_argument("--captions", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="runs per (optimizer, lr): init and data seeds "
                                                             "seed, seed+1, ...; one seed's ratios are within noise")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    args.reset_interval = args.reset_interval or max(1, args.steps // 3)
    args.spam_warmup = args.spam_warmup if args.spam_warmup is not None else round(0.3 * args.reset_interval)
    args.spam_clip_delay = min(20, max(2, args.reset_interval // 5))
    torch.set_num_threads(args.threads)
    label = quant_label(quant_config(args))  # refuses a bad combination before any run

    tokens, vocab = token_stream(caption_corpus(args.captions, args.seed))
    print(f"corpus: {len(tokens)} tokens, vocab {vocab}; uniform-guess loss {math.log(vocab):.3f}")
    print(f"{args.steps} steps, reset every {args.reset_interval}, SPAM warmup {args.spam_warmup} and clip "
          f"delay {args.spam_clip_delay}, "
          f"{label}")
    results: dict[tuple[str, float], list[dict]] = {}
    for lr in args.lrs:
        for name in args.optimizers:
            for seed in range(args.seed, args.seed + args.seeds):
                r = train(name, lr, args, tokens, vocab, seed)
                results.setdefault((name, lr), []).append(r)
                print(f"lr={lr:<8g} {name:12s} seed {seed} final {r['final']:8.4f}  (start {r['initial']:.4f}, "
                      f"min {r['min']:.4f})  diverged={r['diverged']}  spiked={r['spiked']}  skipped={r['skipped']}"
                      f"  steps={r['steps']}  {r['seconds']:.0f}s  [{r['params'] / 1e6:.1f}M params, {label}]",
                      flush=True)
    print(f"\nper optimizer, over {len(args.lrs)} learning rates x {args.seeds} seed(s):")
    for name in args.optimizers:
        runs = [r for lr in args.lrs for r in results[(name, lr)]]
        print(f"  {name:12s} diverged {sum(r['diverged'] for r in runs)}/{len(runs)}, spiked "
              f"{sum(r['spiked'] for r in runs)}/{len(runs)}, skipped updates {sum(r['skipped'] for r in runs)};"
              f"  final loss by lr: " + ", ".join(mean_spread([r['final'] for r in results[(name, lr)]])
                                                   for lr in args.lrs))
    if "adamw" in args.optimizers:
        base = {lr: sum(r["final"] for r in results[("adamw", lr)]) / args.seeds for lr in args.lrs}
        print("mean final loss relative to AdamW's at the same lr:")
        for name in args.optimizers:
            print(f"  {name:12s} " + ", ".join(
                f"lr {lr:g}: {sum(r['final'] for r in results[(name, lr)]) / args.seeds / base[lr]:.3f}x"
                for lr in args.lrs))


if __name__ == "__main__":
    main()
