"""Parameter groups, the optimizer and the learning-rate schedule.

Weight decay skips gains, biases and the logit scale (every tensor with
fewer than two dimensions), as open_clip does. The schedule is linear warmup
then cosine to zero (or to a floor). The optimizer comes from `training.optim`: Stable-SPAM
(the default), SPAM or torch's AdamW.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig
from training.optim import build_optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay)
    options = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer != "adamw":
        options.update(state_bits=config.optimizer_state_bits, reset_interval=config.momentum_reset_interval)
    if config.optimizer == "stable_spam":
        options.update(gamma1=config.spam_gamma1, gamma2=config.spam_gamma2, theta=config.spam_theta)
    if config.fused_optimizer:
        options["fused"] = True
    return build_optimizer(config.optimizer, groups, **options)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  final_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier (step+1)/warmup during warmup, then cosine from 1 to `final_ratio` at total_steps
    (the trainer decays to 0; the Stable-SPAM paper's runs to 0.1)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rescale_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, factor: float) -> None:
    """Scale a resumed schedule's peak learning rates by `factor` (a diverged run retried at a lower --lr):
    loading a checkpoint restores the saved ones, into the schedule and the optimizer. Groups keep their
    ratios; a factor of 1 leaves every value as the schedule itself computes it."""
    scheduler.base_lrs = [base * factor for base in scheduler.base_lrs]
    for group, base, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
