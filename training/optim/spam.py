"""SPAM (Huang et al., 2025): Adam with spike-aware clipping, momentum reset and a warmup after each reset.

At global step T (from 1), with s = T mod reset_interval the steps since the last reset:
- when s == 0: m = v = 0 (the per-tensor bias-correction counter t is *not* reset);
- when s >= clip_delay: every element with g^2 > threshold * v (v from before this step, not
  bias-corrected) becomes sign(g) sqrt(threshold * v), i.e. g is clamped to +-sqrt(threshold * v);
- Adam: m, v as usual, W <- W - lr * r(s) * sqrt(1-beta2^t)/(1-beta1^t) * m / (sqrt(v) + eps),
  with r(s) a cosine ramp from 0.01 to 1 over `warmup_steps` (it also runs from the start of training);
- decoupled weight decay after the update: W <- W - lr wd W.
Defaults are the paper's: threshold 5000, reset every 500, warmup 150 (not the LR warmup: SPAM issue #6), eps 1e-6.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from training.optim.multi_tensor import (MomentOptimizer, bias_correction, check_common, check_int, check_interval,
                                        check_range, clipped_copies, cosine_ramp, ema_coefficient)


def warmup_factor(steps_since_reset: int, warmup_steps: int) -> float:
    """SPAM's post-reset LR factor: cosine from 0.01 (at the reset) to 1 (after warmup_steps)."""
    return cosine_ramp(steps_since_reset, warmup_steps, 0.01, 1.0)


class SPAM(MomentOptimizer):
    """The Stable-SPAM paper's predecessor, as a baseline; same state layouts and skip rules as StableSPAM."""

    stats_fields = ("adam_count", "skipped")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, threshold: float = 5000.0,
                 reset_interval: int | None = 500, warmup_steps: int = 150, clip_delay: int = 20,
                 state_bits: int = 32, block_size: int | None = None) -> None:
        defaults = self.check_options(dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, threshold=threshold,
            reset_interval=reset_interval, warmup_steps=warmup_steps, clip_delay=clip_delay,
            state_bits=state_bits, block_size=block_size))
        super().__init__(params, defaults)

    @staticmethod
    def check_options(options: dict) -> dict:
        options = check_common(options)
        check_range("threshold", options["threshold"], 0.0, math.inf)
        check_interval("reset_interval", options["reset_interval"])
        # Clipping runs where t mod reset_interval >= clip_delay (the spec's condition, t from 1). At t = 1
        # v is still 0, so a delay of 1 made every element a spike, clipped to sqrt(theta * 0) = 0: m and v
        # stayed 0 and nothing trained until the first reset. A delay of the interval or more never clips.
        check_int("warmup_steps", options["warmup_steps"], 0)
        check_int("clip_delay", options["clip_delay"], 2)
        interval = options["reset_interval"]
        if options["threshold"] > 0 and interval is not None and options["clip_delay"] >= interval:
            raise ValueError(f"invalid clip_delay={options['clip_delay']!r}: with reset_interval={interval} no "
                             f"step would ever be clipped (it must be smaller; threshold=0 turns clipping off)")
        return options

    def _step_bucket(self, group: dict, step: int, params: list[torch.Tensor], grads: list[torch.Tensor],
                     states: list[dict], seed: int) -> None:
        lr, wd, eps, threshold = group["lr"], group["weight_decay"], group["eps"], group["threshold"]
        interval = group["reset_interval"]
        since_reset = step % interval if interval is not None else step

        stats = torch.stack([s["stats"] for s in states])
        adam_count, skipped = stats.unbind(1)
        beta1, beta2 = (ema_coefficient(beta, stats.dtype) for beta in group["betas"])
        gmax = torch.stack(torch._foreach_norm(grads, math.inf)).to(stats.dtype)
        finite = torch.isfinite(gmax * gmax)  # a square that overflows would make v inf for good
        clean = clipped_copies(grads, finite, stats.dtype)

        exp_avg, exp_avg_sq, coded = self._load_moments(params, states, group)
        if since_reset == 0:
            torch._foreach_zero_(exp_avg)
            torch._foreach_zero_(exp_avg_sq)
        if threshold > 0 and since_reset >= group["clip_delay"]:
            bound = torch._foreach_mul(exp_avg_sq, threshold)
            torch._foreach_sqrt_(bound)
            # An element with no second moment yet (its first gradient came after the clip delay: a token
            # not seen since the reset) has no scale to spike against: the spec's bound sqrt(theta * 0) = 0
            # zeroed every gradient it got, so it never trained until a reset let it in early enough.
            bound = [torch.where(b > 0, b, math.inf) for b in bound]
            torch._foreach_minimum_(clean, bound)
            torch._foreach_neg_(bound)
            torch._foreach_maximum_(clean, bound)

        one = torch.ones_like(gmax)
        torch._foreach_mul_(clean, 1 - beta1)  # a skipped tensor is already all zeros
        torch._foreach_mul_(exp_avg, torch.where(finite, beta1, one).unbind())
        torch._foreach_add_(exp_avg, clean)
        torch._foreach_mul_(exp_avg_sq, torch.where(finite, beta2, one).unbind())
        torch._foreach_addcmul_(exp_avg_sq, clean, clean, value=(1 - beta2) / (1 - beta1) ** 2)
        del clean  # free the gradient copy before the update buffers are allocated

        count = adam_count + 1
        size = lr * warmup_factor(since_reset, group["warmup_steps"])
        step_size = size * torch.sqrt(bias_correction(beta2, count)) / bias_correction(beta1, count)
        # W -= step * m / (sqrt(v) + eps) as one addcdiv; a skipped tensor divides by inf and adds exactly 0.
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(denom, torch.where(finite, -1 / step_size, math.inf).unbind())
        torch._foreach_addcdiv_(params, exp_avg, denom)
        if wd:
            torch._foreach_mul_(params, torch.where(finite, 1 - lr * wd, torch.ones_like(gmax)).unbind())
        # A skipped tensor keeps its codes, except at a reset, which zeroes its moments too.
        self._store_moments(states, coded, seed, None if since_reset == 0 else finite)

        new_stats = torch.stack([torch.where(finite, count, adam_count), skipped + (~finite).to(stats.dtype)], dim=1)
        torch._foreach_copy_([s["stats"] for s in states], list(new_stats.unbind(0)))
