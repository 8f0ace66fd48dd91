"""The one place the trainer's settings live: a dataclass read by the CLI, the Dagster asset and the tests.

Every field has a default that makes sense on a laptop; `argparse_flags`
turns the fields into `--flags` so the CLI never restates a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

OPTIMIZERS = ("adamw", "stable_spam", "spam")
QUANTIZE = ("none", "int4", "fp4_e2m1", "fp4_e1m2")  # training.optim.quant.FORMATS, without importing torch here

# What 0 ("the optimizer's own") resolves to. Stable-SPAM and SPAM take their paper's (../shared/spec): betas
# (0.9, 0.999) and eps 1e-8 (Stable-SPAM) or 1e-6 (SPAM); AdamW takes CLIP's recipe (beta2 0.98, eps 1e-6).
OWN_BETA2 = {"stable_spam": 0.999, "spam": 0.999, "adamw": 0.98}
OWN_EPS = {"stable_spam": 1e-8, "spam": 1e-6, "adamw": 1e-6}
# Stable-SPAM's two settings from the paper: its 4-bit runs and its BF16 (full-precision) runs.
STABLE_SPAM_4BIT = {"spam_gamma1": 0.7, "spam_gamma2": 0.9, "spam_theta": 0.999, "momentum_reset_interval": 500}
STABLE_SPAM_BF16 = {"spam_gamma1": 0.85, "spam_gamma2": 0.99999, "spam_theta": 0.999, "momentum_reset_interval": 1000}
SPAM_RESET_INTERVAL = 500


class RunMismatch(ValueError):
    """The output holds another run (other settings, data or version) that this one cannot continue:
    `--overwrite` starts over. Its own type, so the demo can start over where a user would be told to;
    here, with no torch import, so the demo need not load the trainer to catch it."""


def opt(default, help: str = ""):
    """A TrainConfig field with its --help text beside it."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """How to train: data, text sampling, model, optimisation, checkpoints and evaluation."""

    input: str = opt("", "directory (or file) of training shards")
    output: str = opt("", "model directory: save_pretrained output, checkpoints, metrics")
    seed: int = opt(0, "seed of every draw: init, data order, crops, text choice, curation")

    # Model and tokenizer.
    preset: str = opt("tiny", "tiny | vit-b-32 | vit-b-16")
    image_size: int = opt(0, "0: the preset's")
    context_length: int = opt(0, "0: the preset's")
    tokenizer: str = opt("", "empty: train a BPE on the shards' texts; else a CLIP tokenizer id or path")
    vocab_size: int = opt(0, "size of the trained BPE; 0: the preset's")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    compile: bool = opt(False, "torch.compile the two towers (saved weights come from the uncompiled model)")

    # Data.
    batch_size: int = opt(64, "per rank and per micro-step")
    workers: int = opt(2, "DataLoader workers per rank (0: decode in the main process)")
    shuffle_buffer: int = opt(1000, "rows per reader mixed before batching")
    holdout_fraction: float = opt(0.05, "share of keys held out of training for retrieval")
    crop_scale_min: float = opt(0.9, "RandomResizedCrop scale range (min, 1.0)")

    # Text sampling (LaCLIP / VeCLIP / ALIP-MetaCLIP 1.2) and online curation (MetaCLIP).
    use_rewrites: bool = opt(True, "LaCLIP: uniform over caption + valid rewrites")
    fused_ratio: float = opt(0.0, "VeCLIP: share of visits that train on the fused caption")
    synthetic_ratio: float = opt(0.0, "share of visits that train on the synthetic caption")
    online_curation: bool = opt(False, "keep each row with its keep_prob, drawn anew every epoch")
    t: float = opt(0.0, "online curation at this MetaCLIP t, from matched_entries and the balance stage's "
                        "entry counts; 0: the keep_prob the balance stage wrote")
    entry_counts: str = opt("", "the balance stage's entry_counts.parquet for --t; empty: found through the "
                                "shards' stage chain")
    assume_online_balanced: bool = opt(False, "with --online_curation on shards without a manifest, or whose "
                                              "manifest records no balance stage (copied away from their stage "
                                              "chain), which cannot be checked: you state that they were "
                                              "balanced with --online_curation, not sampled offline")

    # Optimisation.
    steps: int = opt(200, "optimizer steps of the whole run")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-4, "peak learning rate")
    weight_decay: float = opt(0.2, "decoupled weight decay (not on gains, biases, logit scale)")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.0, "Adam beta2; 0: the optimizer's own (stable_spam and spam 0.999, their paper's; "
                            "adamw 0.98, CLIP's)")
    eps: float = opt(0.0, "Adam epsilon; 0: the optimizer's own (stable_spam 1e-8, spam and adamw 1e-6)")
    warmup_steps: int = opt(20, "linear warmup steps before the cosine decay")
    grad_clip: float = opt(1.0, "0 disables clipping")
    optimizer: str = opt("stable_spam", "from training.optim; adamw is torch's own")
    optimizer_state_bits: int = opt(32, "stable_spam/spam moments stored in 32, 8 or 4 bits (blockwise)")
    fused_optimizer: bool = opt(False, "stable_spam's Triton kernels, or torch's fused AdamW, instead of foreach "
                                       "ops; fused AdamW skips a non-finite step on the GPU without a host sync")
    quantize: str = opt("none", "4-bit training, as Stable-SPAM's paper: none | int4 | fp4_e2m1 | fp4_e1m2 for the "
                                "weights and activations of both towers' linear layers (the projections stay in "
                                "full precision; the saved model holds the full-precision master weights)")
    spam_gamma1: float = opt(0.0, "stable_spam's AdaGN EMA of the gradient norm (gamma1); 0: the paper's, 0.7 "
                                  "with --quantize, else 0.85")
    spam_gamma2: float = opt(0.0, "stable_spam's AdaGN EMA of the squared gradient norm (gamma2); 0: the paper's, "
                                  "0.9 with --quantize, else 0.99999")
    spam_theta: float = opt(0.0, "stable_spam's AdaClip EMA of the largest gradient, its clipping threshold "
                                 "(theta, gamma3); 0: the paper's 0.999")
    momentum_reset_interval: int = opt(0, "steps between momentum resets (stable_spam, spam); 0: the paper's, "
                                          "500 for spam and for stable_spam with --quantize, else 1000")
    precision: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32")
    max_bad_steps: int = opt(5, "steps in a row with a NaN/inf loss or gradient norm before the run stops")

    # Checkpoints and resume.
    checkpoint_every: int = opt(100, "steps between checkpoints")
    keep_checkpoints: int = opt(2, "newest checkpoints kept")
    resume: bool = opt(True, "continue from the newest checkpoint in output (same settings, same input)")
    overwrite: bool = opt(False, "delete what an earlier run left in output (checkpoints, metrics, model), start over")
    stop_after_steps: int = opt(0, "stop (as if killed) after this many steps; 0: run to `steps`")

    # Evaluation and logging.
    eval: str = opt("", "labelled eval split (key, image, label, ...) for zero-shot")
    classes: str = opt("", "classes.json (list of class names); default: eval/../classes.json")
    eval_every: int = opt(0, "0: only at the end")
    holdout_max_pairs: int = opt(1000, "held-out pairs scored for retrieval, the first ones in shard order")
    log_every: int = opt(10, "steps between metric rows")
    progress: bool = opt(True, "progress bar with samples/s")
    threads: int = opt(0, "torch CPU threads; 0: leave torch's default")
    verify_checksums: bool = opt(False, "check every input shard's sha256 against its manifest before training "
                                        "(reads all the data once; sizes are always checked)")
    dist_timeout_minutes: int = opt(60, "how long ranks wait at a collective, e.g. while rank 0 alone trains the "
                                        "tokenizer or evaluates (NCCL's own default is 10 minutes)")

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size > 0, "steps": self.steps > 0, "grad_accum": self.grad_accum > 0,
            "workers": self.workers >= 0, "shuffle_buffer": self.shuffle_buffer >= 1,
            "holdout_fraction": 0.0 <= self.holdout_fraction < 1.0,
            "crop_scale_min": 0.0 < self.crop_scale_min <= 1.0,
            "fused_ratio": 0.0 <= self.fused_ratio <= 1.0, "synthetic_ratio": 0.0 <= self.synthetic_ratio <= 1.0,
            "lr": self.lr > 0 and math.isfinite(self.lr), "warmup_steps": self.warmup_steps >= 0,
            # A negative clip norm would flip the gradient's sign in clip_grad_norm_: gradient ascent.
            "grad_clip": self.grad_clip >= 0 and math.isfinite(self.grad_clip),
            "weight_decay": self.weight_decay >= 0, "beta1": 0 <= self.beta1 < 1, "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps >= 0 and math.isfinite(self.eps), "quantize": self.quantize in QUANTIZE,
            "spam_gamma1": 0 <= self.spam_gamma1 < 1, "spam_gamma2": 0 <= self.spam_gamma2 < 1,
            "spam_theta": 0 <= self.spam_theta < 1, "momentum_reset_interval": self.momentum_reset_interval >= 0,
            "max_bad_steps": self.max_bad_steps >= 1, "checkpoint_every": self.checkpoint_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1, "stop_after_steps": self.stop_after_steps >= 0,
            "optimizer": self.optimizer in OPTIMIZERS, "precision": self.precision in ("auto", "bf16", "fp32"),
            "optimizer_state_bits": self.optimizer_state_bits in (32, 8, 4)
            and (self.optimizer_state_bits == 32 or self.optimizer != "adamw"),
            "fused_optimizer": not self.fused_optimizer or self.optimizer in ("stable_spam", "adamw"),
            "t": self.t >= 0 and math.isfinite(self.t),
            "holdout_max_pairs": self.holdout_max_pairs >= 1, "dist_timeout_minutes": self.dist_timeout_minutes >= 1,
            "log_every": self.log_every >= 1, "eval_every": self.eval_every >= 0, "threads": self.threads >= 0,
            "image_size": self.image_size >= 0, "context_length": self.context_length >= 0,
            "vocab_size": self.vocab_size >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid training settings: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))
        if self.assume_online_balanced and not self.online_curation:
            raise ValueError("--assume_online_balanced is about the input of --online_curation: pass both")
        if (self.t or self.entry_counts) and not (self.online_curation and self.t):
            raise ValueError("--t (and --entry_counts with it) sets the cap of online curation: pass "
                             "--online_curation --t T")
        # Taken and then unused, silently: no zero-shot ran, or the named tokenizer's vocabulary was used.
        if self.classes and not self.eval:
            raise ValueError("--classes names the eval split's classes: pass --eval too")
        if self.vocab_size and self.tokenizer:
            raise ValueError("--vocab_size sizes the BPE trained when no --tokenizer is given: the named "
                             "tokenizer has its own vocabulary; drop one of them")
        if self.fused_ratio + self.synthetic_ratio > 1.0:
            raise ValueError(f"fused_ratio + synthetic_ratio must be <= 1, got {self.fused_ratio + self.synthetic_ratio}")
        self._resolve_optimizer_settings()

    def _resolve_optimizer_settings(self) -> None:
        """Fill every 0 ("the optimizer's own") with its value, so the run's recorded config, and what a resume
        compares, say what was trained with. A setting the chosen optimizer has not is refused, not ignored."""
        own = {"stable_spam": STABLE_SPAM_4BIT if self.quantize != "none" else STABLE_SPAM_BF16,
               "spam": {"momentum_reset_interval": SPAM_RESET_INTERVAL}, "adamw": {}}[self.optimizer]
        foreign = [name for name in STABLE_SPAM_4BIT if name not in own and getattr(self, name)]
        if foreign:
            raise ValueError(f"--{', --'.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not a setting of "
                             f"--optimizer {self.optimizer}")
        for name, value in {**own, "beta2": OWN_BETA2[self.optimizer], "eps": OWN_EPS[self.optimizer]}.items():
            if not getattr(self, name):
                setattr(self, name, value)

    @property
    def classes_path(self) -> Path | None:
        if self.classes:
            return Path(self.classes)
        if self.eval:
            return Path(self.eval).parent / "classes.json"
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def argparse_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per TrainConfig field, typed and defaulted from the dataclass's fields (not from an
    instance, whose __post_init__ has already put each optimizer's own settings in place of the 0s)."""
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        flag = f"--{f.name}"
        text = f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"{text} (default: {default!r})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


# Settings that may differ between a run and its resumption without changing what is trained. The input
# and output are checked otherwise: the input by its fingerprint (its shards' contents, wherever they are
# and however their path is spelled), the output is where the resumed checkpoint was found.
RESUME_FREE = frozenset({"input", "output", "stop_after_steps", "progress", "log_every", "eval_every", "threads",
                         "checkpoint_every", "keep_checkpoints", "resume", "overwrite", "eval", "classes",
                         "holdout_max_pairs", "compile", "gradient_checkpointing", "assume_online_balanced",
                         "dist_timeout_minutes", "verify_checksums"})


# Settings naming a local file or folder (a tokenizer may also be a hub id).
LOCAL_PATHS = frozenset({"tokenizer", "entry_counts"})

# What a run stopped for divergence may change when resumed: its message tells the user to retry so.
RETRY_AFTER_DIVERGENCE = frozenset({"lr", "warmup_steps", "grad_clip", "max_bad_steps"})


def resume_mismatches(saved: dict, current: TrainConfig, diverged: bool = False) -> list[str]:
    """Fields whose change would make a resumed run a different run (a diverged one's retry excepted)."""
    now = current.to_dict()
    free = RESUME_FREE | RETRY_AFTER_DIVERGENCE if diverged else RESUME_FREE
    return sorted(k for k in now if k not in free and k in saved and _as_compared(k, saved[k]) != _as_compared(k, now[k]))


def _as_compared(name: str, value: object) -> object:
    """A local path setting as the file it names (`work/x` is `./work/x`); a hub id or another setting as is."""
    if name in LOCAL_PATHS and value and Path(str(value)).exists():
        return str(Path(str(value)).resolve())
    return value


def resolve_precision(precision: str, device_type: str) -> str:
    """The precision a --precision setting trains with on a device of `device_type` ("auto": bf16 on CUDA,
    fp32 on CPU). A resume compares settings by it: "auto" and what it resolves to train alike."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision == "bf16" and device_type != "cuda":
        raise ValueError("bf16 autocast is for CUDA; use --precision fp32 on CPU")
    return precision
