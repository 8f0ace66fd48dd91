"""The training run: set up, resume, step, checkpoint, evaluate, save.

One `train(config)` serves the CLI, the Dagster asset, the tests and torchrun
(every rank runs it; rank 0 writes files). Order of a step: for each
micro-batch, features -> gathered symmetric InfoNCE -> backward (DDP syncs on
the last micro-batch only); then, unless any rank saw a non-finite loss or
gradient norm, clip, step, clamp the logit scale. A bad step changes no
weight, so the weights are always the last good ones; `max_bad_steps` bad
steps in a row stop the run with a checkpoint of those weights.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training import distributed
from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import TrainConfig, resume_mismatches
from training.data import LoaderState, ShardSet, StreamSpec, counts_summary, inspect_shards, iter_texts, train_batches
from training.evaluate import evaluate_all
from training.image_transforms import image_processor_config
from training.loss import contrastive_loss
from training.metrics_log import CURVES_PNG, METRICS_CSV, MetricsLog, plot_curves
from training.model import PRESETS, ClipTowers, build_model, clamp_logit_scale, clip_config
from training.optimization import make_optimizer, warmup_cosine
from training.text_sampling import TextSampling
from training.tokenizer import load_tokenizer, train_bpe

METRICS_JSON = "metrics.json"
TRAIN_CONFIG = "train_config.json"


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the message names the checkpoint of the last good weights."""


@dataclass
class TrainResult:
    """What a run returns: its final metrics and where the model is."""

    metrics: dict
    output: Path
    steps: int
    checkpoint: Path | None = None
    stopped_early: bool = False
    files: dict = field(default_factory=dict)


def _needed_columns(config: TrainConfig) -> list[str]:
    needed = ["fused_caption"] if config.fused_ratio else []
    needed += ["synthetic_caption"] if config.synthetic_ratio else []
    needed += ["keep_prob"] if config.online_curation else []
    return needed


def _precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if config.precision == "bf16" and device.type != "cuda":
        raise ValueError("bf16 autocast is for CUDA; use --precision fp32 on CPU")
    return config.precision


def _tokenizer(config: TrainConfig, shards: ShardSet, output: Path, context_length: int, d: distributed.Dist,
               resuming: bool):
    """The run's tokenizer: the one saved in output (resume), a named one, or a BPE trained on rank 0."""
    if resuming:
        return load_tokenizer(output, context_length)
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer, context_length)
    elif d.main:
        vocab = config.vocab_size or PRESETS[config.preset].vocab_size
        tokenizer = train_bpe(iter_texts(shards, config.holdout_fraction), vocab, context_length)
    if d.main:
        tokenizer.save_pretrained(output)
    distributed.barrier(d)
    return tokenizer if d.main else load_tokenizer(output, context_length)


def _resume_state(config: TrainConfig, output: Path) -> Path | None:
    """The checkpoint to continue from, after checking it belongs to the same run."""
    checkpoint = latest_checkpoint(output) if config.resume else None
    if checkpoint is None:
        return None
    saved = json.loads((checkpoint / "state.json").read_text())["config"]
    changed = resume_mismatches(saved, config)
    if changed:
        raise ValueError(f"{output} holds a run with other settings ({', '.join(changed)} differ); resuming would mix "
                         f"two runs. Use another --output, or --no-resume to start over there.")
    return checkpoint


def train(config: TrainConfig) -> TrainResult:
    if not config.input or not config.output:
        raise ValueError("train: --input and --output are required")
    d = distributed.setup()
    try:
        return _train(config, d)
    finally:
        distributed.teardown(d)


def _train(config: TrainConfig, d: distributed.Dist) -> TrainResult:
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output)
    shards = inspect_shards(config.input, _needed_columns(config))  # schema errors surface before anything else
    if d.main:
        output.mkdir(parents=True, exist_ok=True)
    distributed.barrier(d)
    checkpoint = _resume_state(config, output)

    preset = PRESETS[config.preset] if config.preset in PRESETS else None
    if preset is None:
        raise ValueError(f"unknown model preset {config.preset!r}; choose one of {sorted(PRESETS)}")
    image_size = config.image_size or preset.image_size
    context_length = config.context_length or preset.context_length
    tokenizer = _tokenizer(config, shards, output, context_length, d, resuming=checkpoint is not None)
    model_config = clip_config(config.preset, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               image_size=image_size, context_length=context_length)
    model = build_model(model_config, config.seed).to(d.device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    towers = ClipTowers(model)
    step_module = DistributedDataParallel(towers, device_ids=[d.local_rank] if d.device.type == "cuda" else None) \
        if d.enabled else towers
    optimizer = make_optimizer(model, config)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, config.steps)
    precision = _precision(config, d.device)

    step, bad_in_row, bad_total, elapsed_before = 0, 0, 0, 0.0
    loader_state = LoaderState()
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, model, optimizer, scheduler, d.device)
        step, bad_total, elapsed_before = saved["step"], saved["bad_steps"], saved.get("seconds", 0.0)
        states = saved["loader"]
        if len(states) != d.world_size:
            raise ValueError(f"{checkpoint} was written by {len(states)} ranks; resume it with the same number")
        loader_state = LoaderState.from_dict(states[d.rank])

    spec = StreamSpec(shards, config.seed, image_size, context_length,
                      TextSampling(config.use_rewrites, config.fused_ratio, config.synthetic_ratio),
                      config.holdout_fraction, config.crop_scale_min, config.online_curation, config.shuffle_buffer)
    holdout = StreamSpec(shards, config.seed, image_size, context_length, holdout_fraction=config.holdout_fraction,
                         shuffle_buffer=1, train=False)
    batches = train_batches(spec, tokenizer, loader_state, workers=config.workers, batch_size=config.batch_size,
                            rank=d.rank, world_size=d.world_size, pin_memory=d.device.type == "cuda")
    log = MetricsLog(output, resume_step=step) if d.main else None
    if d.main:
        (output / TRAIN_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))

    def save(at: int) -> Path | None:
        states = distributed.gather_objects(d, loader_state.to_dict())
        path = None
        if d.main:
            path = save_checkpoint(output, at, model, optimizer, scheduler, {
                "config": config.to_dict(), "loader": states, "bad_steps": bad_total,
                "seconds": elapsed_before + time.perf_counter() - started}, keep=config.keep_checkpoints)
        distributed.barrier(d)
        return path

    def run_eval() -> dict:
        metrics = {}
        if d.main:
            metrics = evaluate_all(model, tokenizer, holdout=holdout, eval_dir=config.eval or None,
                                   classes_path=config.classes_path, image_size=image_size,
                                   context_length=context_length, device=d.device, precision=precision)
        distributed.barrier(d)
        return metrics

    end = min(config.steps, config.stop_after_steps) if config.stop_after_steps else config.steps
    progress = tqdm(total=end, initial=step, desc="train", unit="step", disable=not (d.main and config.progress),
                    mininterval=1.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    started = time.perf_counter()
    window_loss, window_samples, window_start, data_wait = [], 0, time.perf_counter(), 0.0
    last_checkpoint = checkpoint
    model.train()
    while step < end:
        losses, bad = [], False
        for micro in range(config.grad_accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - wait_start
            sync = nullcontext() if (not d.enabled or micro == config.grad_accum - 1) else step_module.no_sync()
            with sync:
                with autocast:
                    image, text, scale = step_module(batch["pixel_values"].to(d.device, non_blocking=True),
                                                     batch["input_ids"].to(d.device, non_blocking=True),
                                                     batch["attention_mask"].to(d.device, non_blocking=True))
                loss = contrastive_loss(image, text, scale)
                bad = bad or not math.isfinite(loss.item())
                (loss / config.grad_accum).backward()
            losses.append(loss.item())
            window_samples += batch["pixel_values"].shape[0] * d.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        bad = distributed.any_true(d, bad or not math.isfinite(grad_norm.item()))
        if bad:
            optimizer.zero_grad(set_to_none=True)
            bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
            progress.write(f"[train] step {step + 1}: non-finite loss or gradient ({losses}); update skipped "
                           f"({bad_in_row} in a row, {bad_total} in all)")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale(model)
            bad_in_row = 0
            window_loss.append(sum(losses) / len(losses))
        scheduler.step()
        step += 1
        progress.update(1)
        if bad_in_row >= config.max_bad_steps:
            path = save(step)
            progress.close()
            raise TrainingDiverged(
                f"{bad_in_row} non-finite losses in a row (steps {step - bad_in_row + 1}..{step}); training stopped. "
                f"No bad step changed the weights; the last good weights are in {path or last_checkpoint}. "
                f"Lower --lr, raise --warmup_steps or check the data, then resume.")
        if log is not None and (step % config.log_every == 0 or step == end):
            now = time.perf_counter()
            rate = window_samples / max(now - window_start, 1e-9)
            values = {"lr": scheduler.get_last_lr()[0], "logit_scale": model.logit_scale.exp().item(),
                      "samples_per_s": rate, "data_wait_fraction": data_wait / max(now - window_start, 1e-9),
                      "bad_steps": bad_total}
            if window_loss:
                values["loss"] = sum(window_loss) / len(window_loss)
            log.log(step, values)
            progress.set_postfix(loss=f"{values.get('loss', float('nan')):.3f}", samples_s=f"{rate:.0f}")
            window_loss, window_samples, window_start, data_wait = [], 0, now, 0.0
        if step % config.checkpoint_every == 0 and step < end:
            last_checkpoint = save(step)
        if config.eval_every and step % config.eval_every == 0 and step < end:
            metrics = run_eval()
            if log is not None and metrics:
                log.log(step, metrics)
    progress.close()
    last_checkpoint = save(step)
    stopped_early = step < config.steps
    result = TrainResult({}, output, step, last_checkpoint, stopped_early)
    if stopped_early:
        return result
    metrics = run_eval()
    if d.main:
        seconds = elapsed_before + time.perf_counter() - started
        loss_curve = MetricsLog.series(output / METRICS_CSV, "loss")
        metrics.update({"steps": step, "seconds": round(seconds, 2), "bad_steps": bad_total,
                        "samples_seen": step * config.batch_size * config.grad_accum * d.world_size,
                        "first_loss": loss_curve[0][1] if loss_curve else None,
                        "final_loss": loss_curve[-1][1] if loss_curve else None,
                        "epochs": loader_state.epoch, **counts_summary(loader_state.counts)})
        log.log(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
        log.close()
        _save_final(model, output, image_size)
        curves = plot_curves(output)
        (output / METRICS_JSON).write_text(json.dumps(metrics, indent=2))
        result.files = {"metrics_json": METRICS_JSON, "metrics_csv": METRICS_CSV,
                        "curves_png": CURVES_PNG if curves else None}
    result.metrics = distributed.broadcast_object(d, metrics)
    return result


def _save_final(model, output: Path, image_size: int) -> None:
    """save_pretrained beside the tokenizer, plus a preprocessor_config.json CLIPImageProcessor reads."""
    model.save_pretrained(output)
    (output / "preprocessor_config.json").write_text(json.dumps(image_processor_config(image_size), indent=2))
