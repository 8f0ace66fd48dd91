"""One optimizer step with no host sync in it: the same code for the trainer and its benchmark.

Order: for each micro-batch, the uint8 pixels are normalised on the device,
then features -> gathered symmetric InfoNCE -> backward (DDP syncs on the last
micro-batch only); then the gradient is clipped and the update applied, unless
the loss or the gradient norm is non-finite on any rank.

Why no sync: `.item()` on a loss makes the host wait for the GPU to finish
the step so far, and the GPU then idles while the host queues the next
kernels. So the bad-step decision is a bool tensor that gates the update on
the device:
- torch's fused Adam/AdamW take it as `found_inf`, as after a GradScaler's
  skipped step: weights, moments and step count are left as they were;
- Stable-SPAM and SPAM skip every tensor whose gradient is non-finite and
  keep its moments, so a bad step's gradients are all made NaN and the whole
  update is skipped (their host-side step counter, like the learning-rate
  schedule, still advances, and a momentum reset due at that step still
  zeroes the moments: the reset follows the step count, not the data);
- any other optimizer: the host reads the flag, one sync per step.
The loss and the bad-step counters stay on the device too (`StepHealth`);
the trainer reads them, with the logit scale, at log rows and checkpoints,
one sync each (and, under DDP, one all-reduce for the rank-mean loss).

Stop: once `max_bad_steps` bad steps come in a row, every later step is
skipped on the device as well, so when the trainer next reads the counters
and stops, the weights are still the last good ones, however late it looked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training import distributed
from training.image_transforms import normalise
from training.loss import contrastive_loss
from training.model import clamp_logit_scale
from training.optim.multi_tensor import MomentOptimizer


@dataclass(frozen=True)
class HealthReport:
    """The device counters as the host last read them."""

    step: int
    bad_total: int
    bad_in_row: int
    new_bad: int                # bad steps since the previous read
    stopped_at: int             # the step at which max_bad_steps in a row were reached; 0: not stopped
    loss: float | None          # mean loss of the good steps since the loss window was last reset
    logit_scale: float          # exp of the model's (clamped) log logit scale
    open_window: tuple[float, int] = (0.0, 0)  # (loss sum, good steps) still in the window after this read

    def resumable(self) -> dict:
        """What a checkpoint keeps of the counters, so a resumed run logs and stops as a straight one would."""
        return {"bad_steps": self.bad_total, "bad_in_row": self.bad_in_row, "loss_window": list(self.open_window)}


class StepHealth:
    """Non-finite step bookkeeping and the running loss, as device tensors, read with the model's logit scale."""

    def __init__(self, device: torch.device, max_bad_steps: int, log_scale: torch.Tensor, step: int = 0,
                 saved: dict | None = None, dist: distributed.Dist | None = None):
        """`saved`: a checkpoint's state, holding `HealthReport.resumable()`: its streak and open loss window
        go on. `dist`: the loss read is the mean over ranks (each rank's loss covers its own rows only)."""
        saved = saved or {}
        self.dist = dist
        self.max_bad_steps = max_bad_steps
        self.log_scale = log_scale
        counter = dict(dtype=torch.int64, device=device)
        loss_sum, good = saved.get("loss_window", (0.0, 0))
        self.step = torch.tensor(step, **counter)
        self.bad_total = torch.tensor(saved.get("bad_steps", 0), **counter)
        self.bad_in_row = torch.tensor(saved.get("bad_in_row", 0), **counter)
        self.good = torch.tensor(good, **counter)
        self.new_bad, self.stopped_at = torch.zeros((), **counter), torch.zeros((), **counter)
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float32, device=device)

    def allowed(self) -> torch.Tensor:
        """Whether updates may still happen (false once the run has diverged)."""
        return self.stopped_at == 0

    def record(self, ok: torch.Tensor, loss: torch.Tensor, allowed: torch.Tensor) -> None:
        self.step += 1
        bad, good = allowed & ~ok, allowed & ok
        self.bad_in_row = torch.where(good, 0, torch.where(bad, self.bad_in_row + 1, self.bad_in_row))
        self.bad_total += bad
        self.new_bad += bad
        self.stopped_at = torch.where(bad & (self.bad_in_row >= self.max_bad_steps), self.step, self.stopped_at)
        self.loss_sum += torch.where(good, loss.float(), 0.0)
        self.good += good

    def read(self, reset_loss: bool = True) -> HealthReport:
        """One host sync for every counter and the logit scale; `new_bad` starts again, and the loss window if asked.

        Under DDP every rank must call it at the same step: the loss sum is averaged over ranks there. The
        good-step count needs no reduction, as every rank skips the same steps. A resumed window holds the
        mean already, and the mean of equal values is that value, so it stays right across a resume."""
        loss_sum = self.loss_sum
        if self.dist is not None and self.dist.enabled:
            loss_sum = distributed.mean(self.dist, loss_sum)
        values = torch.stack([t.detach().double() for t in (self.step, self.bad_total, self.bad_in_row, self.new_bad,
                                                             self.stopped_at, self.good, loss_sum,
                                                             self.log_scale)]).tolist()
        step, total, in_row, new_bad, stopped, good, loss_sum, log_scale = values
        self.new_bad.zero_()
        if reset_loss:
            self.good.zero_()
            self.loss_sum.zero_()
        return HealthReport(int(step), int(total), int(in_row), int(new_bad), int(stopped),
                            loss_sum / good if good else None, math.exp(log_scale),
                            (0.0, 0) if reset_loss else (loss_sum, int(good)))


def apply_update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], ok: torch.Tensor) -> None:
    """`optimizer.step()` where `ok` is true, nothing where it is false; decided on the device if the optimizer can."""
    if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif isinstance(optimizer, MomentOptimizer):
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, torch.where(ok, 1.0, math.nan))
        optimizer.step()
    elif bool(ok):  # a host sync: this optimizer cannot skip an update on the device
        optimizer.step()


class TrainStep:
    """Forward, backward, clip and (gated) update of one optimizer step over `grad_accum` micro-batches.

    `module` maps (normalised pixels, input ids, attention mask) to (image
    features, text features, logit scale): the towers, wrapped in DDP and/or
    torch.compile as the run asks. `model` holds the parameters and the logit
    scale that is clamped after each step.
    """

    def __init__(self, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *,
                 device: torch.device, grad_accum: int = 1, grad_clip: float = 1.0, precision: str = "fp32",
                 dist: distributed.Dist | None = None, ddp: DistributedDataParallel | None = None,
                 max_bad_steps: int = 5, step: int = 0, health: dict | None = None):
        self.module, self.model, self.optimizer, self.scheduler = module, model, optimizer, scheduler
        self.device, self.grad_accum, self.grad_clip = device, grad_accum, grad_clip
        self.dist, self.ddp = dist, ddp
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr = float(optimizer.param_groups[0]["lr"])  # the rate the last step trained with, for its log row
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        self.health = StepHealth(device, max_bad_steps, model.logit_scale, step, health, dist)

    def __call__(self, fetch: Callable[[], dict]) -> int:
        """One step on `grad_accum` batches from `fetch`; returns the samples this rank trained on."""
        total = torch.zeros((), device=self.device)
        samples = 0
        for micro in range(self.grad_accum):
            batch = fetch()
            last = micro == self.grad_accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
            with sync:
                with self.autocast:
                    image, text, scale = self.module(
                        normalise(batch["pixel_values"].to(self.device, non_blocking=True)),
                        batch["input_ids"].to(self.device, non_blocking=True),
                        batch["attention_mask"].to(self.device, non_blocking=True))
                loss = contrastive_loss(image, text, scale)
                (loss / self.grad_accum).backward()
            total += loss.detach()
            samples += batch["pixel_values"].shape[0]
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or math.inf)
        ok = torch.isfinite(total) & torch.isfinite(norm)
        if self.dist is not None:
            ok = distributed.all_true(self.dist, ok)
        allowed = self.health.allowed()
        apply_update(self.optimizer, self.params, ok & allowed)
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(self.model)
        self.lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        self.health.record(ok, total / self.grad_accum, allowed)
        return samples
