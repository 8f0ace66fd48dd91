"""The training run: set up, resume, step, checkpoint, evaluate, save.

One `train(config)` serves the CLI, the Dagster asset, the tests and torchrun
(every rank runs it; rank 0 writes files). The step itself is
`training.step.TrainStep` (shared with the benchmark): it never waits for the
GPU, and a step with a non-finite loss or gradient changes no weight. The
loop reads the step's device counters only at log rows, checkpoints and
evaluations, and stops a run whose `max_bad_steps` bad steps came in a row,
with a checkpoint of the last good weights.

A run belongs to its output directory (`training.run_dir`): resuming needs
the same settings and the same input shards, and `--overwrite` clears what
an earlier run left there.
"""

from __future__ import annotations

import collections
import contextlib
import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from curation.output_lock import output_lock
from curation.shards import atomic_write_bytes, is_complete, verify_manifest
from training import distributed
from training.checkpoint import latest_checkpoint, load_checkpoint, restore_interrupted_save, save_checkpoint
from training.config import RETRY_AFTER_DIVERGENCE, TrainConfig, resolve_precision
from training.data import DATA_ORDER, LoaderState, StreamSpec, counts_summary, readers_for, train_batches
from training.evaluate import check_eval_inputs, evaluate_all
from training.image_transforms import image_processor_config
from training.metrics_log import CURVES_PNG, METRICS_CSV, MetricsLog, plot_curves
from training.model import PRESETS, ClipTowers, build_model, clip_config
from training.online_curation import check_curation_column, check_entry_ids, curation_probabilities
from training.optimization import make_optimizer, rescale_schedule, warmup_cosine
from training.run_dir import TRAIN_CONFIG, curation_fingerprint, prepare_output, resume_checkpoint, trained_to_the_end
from training.shard_set import ShardSet, input_fingerprint, inspect_shards, iter_texts
from training.step import HealthReport, TrainStep
from training.text_sampling import TextSampling
from training.tokenizer import load_tokenizer, train_bpe

METRICS_JSON = "metrics.json"
EVAL_SECONDS = "eval_seconds"


class TrainingDiverged(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient norm; the message names the checkpoint of
    the last good weights."""


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
    if config.online_curation:
        needed.append("matched_entries" if config.t else "keep_prob")
    return needed


def _tokenizer(config: TrainConfig, shards: ShardSet, output: Path, context_length: int, d: distributed.Dist,
               named, resuming: bool):
    """The run's tokenizer: the one saved in output (resume), the `--tokenizer` one (`named` if it was loaded
    already), or a BPE trained on rank 0."""
    if resuming:
        return load_tokenizer(output, context_length)

    def make_and_save():
        if config.tokenizer:
            tokenizer = named if named is not None else load_tokenizer(config.tokenizer, context_length)
        else:
            vocab = config.vocab_size or PRESETS[config.preset].vocab_size
            sampled = TextSampling(config.use_rewrites, config.fused_ratio, config.synthetic_ratio).columns
            tokenizer = train_bpe(iter_texts(shards, config.holdout_fraction, sampled), vocab, context_length)
        tokenizer.save_pretrained(output)
        return tokenizer

    tokenizer = distributed.on_main(d, make_and_save)
    return tokenizer if d.main else load_tokenizer(output, context_length)


def _refuse_late_failures(config: TrainConfig, d: distributed.Dist, shards) -> str:
    """The settings found wrong only once the model is built or the first batch drawn, checked before
    --overwrite clears the output (they cost the earlier run there); the run's precision.

    A batch of one pair over every rank has no negatives: its contrastive loss is exactly 0 and nothing
    learns."""
    precision = resolve_precision(config.precision, d.device.type)
    readers_for(shards, config.workers, d.world_size, config.batch_size)
    if config.batch_size * d.world_size < 2:
        raise ValueError(f"--batch_size {config.batch_size} on {d.world_size} rank(s) gives a contrastive batch of "
                         f"one pair, whose loss is 0: use 2 or more")
    if config.fused_optimizer:  # the fused kernels refuse a device (CPU without Triton's interpreter) here
        make_optimizer(torch.nn.Linear(8, 8, device=d.device), config)
    return precision


def train(config: TrainConfig) -> TrainResult:
    if not config.input or not config.output:
        raise ValueError("train: --input and --output are required")
    d = distributed.setup(timedelta(minutes=config.dist_timeout_minutes))
    try:
        with contextlib.ExitStack() as held:
            # A second run on the same output would interleave checkpoints and metrics rows with this one's,
            # or wipe them (--overwrite) while this one writes: rank 0 holds the output for the whole run.
            distributed.on_main(d, lambda: held.enter_context(output_lock(config.output, "train")))
            return _train(config, d)
    finally:
        distributed.teardown(d)


def _train(config: TrainConfig, d: distributed.Dist) -> TrainResult:
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output)
    preset = PRESETS.get(config.preset)
    if preset is None:
        raise ValueError(f"unknown model preset {config.preset!r}; choose one of {sorted(PRESETS)}")
    image_size = config.image_size or preset.image_size
    context_length = config.context_length or preset.context_length
    if image_size < preset.patch_size:  # found in torch at the first forward, after the tokenizer was trained
        raise ValueError(f"--image_size {image_size} is smaller than the {config.preset} preset's patch size "
                         f"{preset.patch_size}")
    # A checkpoint a killed save renamed aside is put back before anything asks for the newest one.
    distributed.on_main(d, lambda: restore_interrupted_save(output))
    # Input errors surface before anything is written, or cleared by --overwrite, and not after the last step.
    shards = inspect_shards(config.input, _needed_columns(config))
    if config.verify_checksums and is_complete(config.input) and not trained_to_the_end(config, output):
        distributed.on_main(d, lambda: verify_manifest(config.input))
    if config.online_curation:
        check_curation_column(shards, config.t)
    entry_p = curation_probabilities(config)
    if entry_p is not None:
        check_entry_ids(shards, entry_p)
    # A resume uses the tokenizer saved with the run: the named one need not load any more.
    resumable = config.resume and not config.overwrite and latest_checkpoint(output) is not None
    named = load_tokenizer(config.tokenizer, context_length) if config.tokenizer and not resumable else None
    check_eval_inputs(config.eval, config.classes_path)
    precision = _refuse_late_failures(config, d, shards)
    fingerprint = input_fingerprint(config.input)
    curation = curation_fingerprint(entry_p)
    distributed.on_main(d, lambda: prepare_output(config, output))
    checkpoint = resume_checkpoint(config, output, fingerprint, d.device, curation)
    tokenizer = _tokenizer(config, shards, output, context_length, d, named, resuming=checkpoint is not None)
    model_config = clip_config(config.preset, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               image_size=image_size, context_length=context_length)
    model = build_model(model_config, config.seed, config.quantize).to(d.device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    towers = ClipTowers(model)
    ddp = DistributedDataParallel(towers, device_ids=[d.local_rank] if d.device.type == "cuda" else None) \
        if d.enabled else None
    step_module = ddp or towers
    if config.compile:  # the compiled wrapper only runs the step; weights are saved from `model`
        step_module = torch.compile(step_module)
    optimizer = make_optimizer(model, config)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, config.steps)

    step, health, elapsed_before = 0, {}, 0.0
    loader_state = LoaderState()
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, model, optimizer, scheduler, d.device)
        rescale_schedule(scheduler, config.lr / saved["config"]["lr"])
        # The saved state holds HealthReport.resumable()'s counters, which StepHealth takes from it.
        step, health, elapsed_before = saved["step"], saved, saved.get("seconds", 0.0)
        states = saved["loader"]
        if len(states) != d.world_size:
            raise ValueError(f"{checkpoint} was written by {len(states)} ranks; resume it with the same number")
        loader_state = LoaderState.from_dict(states[d.rank])

    spec = StreamSpec(shards, config.seed, image_size, context_length,
                      TextSampling(config.use_rewrites, config.fused_ratio, config.synthetic_ratio),
                      config.holdout_fraction, config.crop_scale_min, config.online_curation, config.shuffle_buffer,
                      entry_p=entry_p)
    holdout = StreamSpec(shards, config.seed, image_size, context_length, holdout_fraction=config.holdout_fraction,
                         shuffle_buffer=1, train=False, max_rows=config.holdout_max_pairs)
    train_step = TrainStep(step_module, model, optimizer, scheduler, device=d.device, grad_accum=config.grad_accum,
                           grad_clip=config.grad_clip, precision=precision, dist=d if d.enabled else None, ddp=ddp,
                           max_bad_steps=config.max_bad_steps, step=step, health=health)
    batches = train_batches(spec, tokenizer, loader_state, workers=config.workers, batch_size=config.batch_size,
                            rank=d.rank, world_size=d.world_size, pin_memory=d.device.type == "cuda")
    log = MetricsLog(output, resume_step=step) if d.main else None
    if d.main:
        atomic_write_bytes(output / TRAIN_CONFIG, json.dumps(config.to_dict(), indent=2).encode())
    run = _Run(config, d, output, model, optimizer, scheduler, train_step, loader_state, log, fingerprint, curation,
               elapsed_before, tokenizer, holdout, image_size, context_length, precision)
    try:
        if checkpoint is not None:
            run.evaluate_if_missed(step)
        steps, last_checkpoint, report = run.loop(batches, step, checkpoint)
    finally:
        batches.close()
    stopped_early = steps < config.steps
    result = TrainResult({}, output, steps, last_checkpoint, stopped_early)
    if stopped_early:
        return result
    # The model is saved before the final evaluation: an evaluation that fails (out of memory, a bad
    # split) then costs its metrics, not the trained model.
    distributed.on_main(d, lambda: _save_final(model, output, image_size))
    metrics = run.evaluate()
    # Each rank counted only the rows it read: the run's counters are their sum.
    counts = sum((collections.Counter(c) for c in distributed.gather_objects(d, loader_state.counts)),
                 collections.Counter())
    epochs = min(distributed.gather_objects(d, loader_state.epoch))  # finished by every reader of every rank

    def finish() -> dict:
        """Rank 0's last writes: the final metrics and the curves."""
        seconds = elapsed_before + time.perf_counter() - run.started
        loss_curve = MetricsLog.series(output / METRICS_CSV, "loss")
        metrics.update({"steps": steps, "seconds": round(seconds, 2), "bad_steps": report.bad_total,
                        "samples_seen": steps * config.batch_size * config.grad_accum * d.world_size,
                        "first_loss": loss_curve[0][1] if loss_curve else None,
                        "final_loss": loss_curve[-1][1] if loss_curve else None,
                        "epochs": epochs, **counts_summary(counts)})
        log.replace(steps, {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
        log.close()
        curves = plot_curves(output)
        atomic_write_bytes(output / METRICS_JSON, json.dumps(metrics, indent=2).encode())
        result.files = {"metrics_json": METRICS_JSON, "metrics_csv": METRICS_CSV,
                        "curves_png": CURVES_PNG if curves else None}
        return metrics

    result.metrics = distributed.broadcast_object(d, distributed.on_main(d, finish))
    return result


@dataclass
class _Run:
    """The pieces the step loop, its checkpoints and its evaluations share."""

    config: TrainConfig
    d: distributed.Dist
    output: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_step: TrainStep
    loader_state: LoaderState
    log: MetricsLog | None
    fingerprint: str
    curation: str | None
    elapsed_before: float
    tokenizer: object
    holdout: StreamSpec
    image_size: int
    context_length: int
    precision: str
    started: float = field(default_factory=time.perf_counter)

    def save(self, at: int, report: HealthReport, diverged: bool = False) -> Path | None:
        """A checkpoint of every rank's state and the step counters; `diverged` marks the last good weights
        of a stopped run, which a resume may retry with RETRY_AFTER_DIVERGENCE settings changed."""
        states = distributed.gather_objects(self.d, self.loader_state.to_dict())
        return distributed.on_main(self.d, lambda: save_checkpoint(
            self.output, at, self.model, self.optimizer, self.scheduler, {
                "config": self.config.to_dict(), "input": self.fingerprint, "curation": self.curation,
                "loader": states,
                **report.resumable(), **({"bad_in_row": 0} if diverged else {}),  # a retry starts a new streak
                "seconds": self.elapsed_before + time.perf_counter() - self.started, "diverged": diverged,
                "data_order": DATA_ORDER},
            keep=self.config.keep_checkpoints))

    def evaluate(self) -> dict:
        """Rank 0 evaluates; the others get {} (and stop with it if it fails). The metrics come with the
        evaluation's duration, EVAL_SECONDS, which also marks in the log the steps that were evaluated."""
        def work() -> dict:
            start = time.perf_counter()
            metrics = evaluate_all(
                self.model, self.tokenizer, holdout=self.holdout, eval_dir=self.config.eval or None,
                classes_path=self.config.classes_path, image_size=self.image_size,
                context_length=self.context_length, device=self.d.device, precision=self.precision)
            return {**metrics, EVAL_SECONDS: round(time.perf_counter() - start, 3)} if metrics else {}

        return distributed.on_main(self.d, work) or {}

    def eval_due(self, step: int) -> bool:
        """Whether a mid-run evaluation follows this step (the last step has the final evaluation instead)."""
        return bool(self.config.eval_every) and step % self.config.eval_every == 0 and step < self.config.steps

    def evaluate_and_log(self, step: int, again: bool = False) -> None:
        """`again`: in place of what the log holds at `step` (a kill mid-append, a log from before
        EVAL_SECONDS), so no metric is there twice."""
        metrics = self.evaluate()
        if self.log is not None and metrics:
            (self.log.replace if again else self.log.log)(step, metrics)

    def evaluate_if_missed(self, step: int) -> None:
        """A run resumed at a checkpoint whose evaluation is not in the log (it failed, or the run was
        killed during it) evaluates those weights first: the resumed run never comes back to that step."""
        missed = self.eval_due(step) and distributed.broadcast_object(self.d, distributed.on_main(
            self.d, lambda: EVAL_SECONDS not in self.log.metrics_at(step)))
        if missed:
            self.evaluate_and_log(step, again=True)

    def loop(self, batches, step: int, checkpoint: Path | None) -> tuple[int, Path | None, HealthReport]:
        """Steps until the end (or `stop_after_steps`); returns the step reached, its checkpoint, the last report."""
        config, d = self.config, self.d
        end = min(config.steps, config.stop_after_steps) if config.stop_after_steps else config.steps
        progress = tqdm(total=end, initial=step, desc="train", unit="step", disable=not (d.main and config.progress),
                        mininterval=1.0)
        window = {"samples": 0, "start": time.perf_counter(), "wait": 0.0, "read": step}
        last_checkpoint, saved_at = checkpoint, None

        def fetch() -> dict:
            start = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - start
            return batch

        def check(at: int, reset_loss: bool) -> HealthReport:
            """Read the step's counters (one sync), report skipped steps, stop a diverged run."""
            report = self.train_step.health.read(reset_loss)
            if report.new_bad and d.main:  # every rank counts the same steps: one says so
                progress.write(f"[train] steps {window['read'] + 1}..{at}: {report.new_bad} with a non-finite loss "
                               f"or gradient, update skipped ({report.bad_in_row} in a row, {report.bad_total} in all)")
            window["read"] = at
            if report.stopped_at:
                if reset_loss:  # a log row: write it, or its window's good steps are in no row
                    self._log_row(at, report, window, progress)
                path = self.save(at, report, diverged=True)
                progress.close()
                first, late = report.stopped_at - config.max_bad_steps + 1, at > report.stopped_at
                raise TrainingDiverged(
                    f"{config.max_bad_steps} steps in a row with a non-finite loss or gradient norm "
                    f"(steps {first}..{report.stopped_at}); "
                    f"training stopped{f' at step {at}, the steps after skipped' if late else ''}. No bad step "
                    f"changed the weights; the last good weights are in {path or last_checkpoint}. "
                    f"Lower --lr, raise --warmup_steps or --grad_clip, or check the data, then resume: a resume "
                    f"of that checkpoint may change {', '.join('--' + k for k in sorted(RETRY_AFTER_DIVERGENCE))}.")
            return report

        self.model.train()
        report = None
        while step < end:
            window["samples"] += self.train_step(fetch) * d.world_size
            step += 1
            progress.update(1)
            # A `stop_after_steps` end is saved after the loop, its loss window left open, so the resumed run
            # writes the rows a straight run would. An evaluation due there is made all the same, after its
            # checkpoint: one that fails costs no steps, and the resumed run makes it first (evaluate_if_missed).
            # The run's last step has the final evaluation instead.
            log_row = step % config.log_every == 0 or step == config.steps
            eval_due = self.eval_due(step)
            checkpoint_due = (step % config.checkpoint_every == 0 and step < end) or (eval_due and step == end)
            if not (log_row or checkpoint_due or eval_due):
                continue
            report = check(step, reset_loss=log_row)
            if log_row:
                self._log_row(step, report, window, progress)
            paused = time.perf_counter()
            if checkpoint_due:
                last_checkpoint, saved_at = self.save(step, report), step
            if eval_due:
                self.evaluate_and_log(step)
            # Time spent saving and evaluating is no training: the next row's samples/s and data wait leave it out.
            window["start"] += time.perf_counter() - paused
        progress.close()
        if saved_at == step:
            return step, last_checkpoint, report
        report = check(step, reset_loss=False) if report is None or report.step != step else report
        return step, self.save(step, report), report

    def _log_row(self, step: int, report: HealthReport, window: dict, progress) -> None:
        now = time.perf_counter()
        elapsed = max(now - window["start"], 1e-9)
        rate = window["samples"] / elapsed
        if self.log is not None:
            values = {"lr": self.train_step.lr, "logit_scale": report.logit_scale,
                      "samples_per_s": rate, "data_wait_fraction": window["wait"] / elapsed,
                      "bad_steps": report.bad_total}
            if report.loss is not None:
                values["loss"] = report.loss
            self.log.log(step, values)
            progress.set_postfix(loss=f"{values.get('loss', float('nan')):.3f}", samples_s=f"{rate:.0f}")
        window.update(samples=0, start=now, wait=0.0)


def _save_final(model, output: Path, image_size: int) -> None:
    """save_pretrained beside the tokenizer, plus a preprocessor_config.json CLIPImageProcessor reads."""
    model.save_pretrained(output)
    atomic_write_bytes(output / "preprocessor_config.json",
                       json.dumps(image_processor_config(image_size), indent=2).encode())
