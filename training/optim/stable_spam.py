"""Stable-SPAM (Huang et al., 2025): AdamW with AdaClip, AdaGN and momentum reset.

One step for one tensor W with gradient g, at global step T (see shared/spec/stable_spam.md):
1. W <- W (1 - lr wd).
2. AdaClip: G = max|g|, M <- theta M + (1-theta) G, tau = M / (1 - theta^j);
   elements with |g_i| > tau are scaled by tau / G.
3. AdaGN: n = ||g||, a <- g1 a + (1-g1) n, b <- g2 b + (1-g2) n^2,
   c = (a / (1-g1^j)) / (sqrt(b / (1-g2^j)) + eps); g <- g c / n when n > 0.
4. Reset: when T % reset_interval == 0, m = v = 0 and k = 1 before this step's update.
5. Adam with bias corrections in k.

`code_exact=True` reproduces the reference repository instead: the reset step still updates with the
old moments (zeroed only afterwards), AdaClip/AdaGN use the resetting counter k instead of j, and the
c_T decay (below) is the repo's. `total_T` (either mode, default off) multiplies beta1 and gamma1 by a
cosine factor c_T from 1 towards `eta_min`, as the reference trainer always does (it passes 20000):
clean, c_T reaches eta_min at T = total_T and stays; code_exact, c_T is torch's CosineAnnealingLR with
T_max = total_T + 1 evaluated at T, i.e. eta_min + (1 - eta_min)(1 + cos(pi T / (total_T + 1))) / 2,
unclamped (it rises again after T = total_T + 1, as the repo's does).

Non-finite gradients, and finite ones whose square or norm overflows the statistics' dtype (1e30 in fp32
would turn AdaGN's mean square into inf and the weights into NaN): that tensor's step is skipped (parameter,
moments and statistics untouched bit for bit, apart from a scheduled reset) and counted in `skipped_steps()`.
Nothing in `step` syncs with the host.

`fused=True` runs the per-element work as two multi-tensor Triton kernels (`fused_triton.py`) instead
of the foreach passes; the per-tensor statistics are the same code in both paths. It is a choice of the
constructor for the whole optimizer: param groups cannot set it, and load_state_dict keeps it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from training.optim.multi_tensor import (MomentOptimizer, bias_correction, check_common, check_interval, check_range,
                                        clipped_copies, cosine_ramp, ema_coefficient)


def load_fused_kernels():
    """Import the Triton kernels on demand: the foreach path must work where triton is not installed."""
    try:
        from training.optim import fused_triton
    except ImportError as error:
        raise ImportError(f"StableSPAM(fused=True) needs triton ({error}); install it or use fused=False") from error
    return fused_triton


def beta_decay(step: int, total_T: int | None, eta_min: float, code_exact: bool) -> float:
    """c_T, the factor on beta1 and gamma1 at global step `step` (1 without total_T); see the module docstring."""
    if not total_T:
        return 1.0
    if code_exact:
        return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * step / (total_T + 1))) / 2
    return cosine_ramp(step, total_T, 1.0, eta_min)


class StableSPAM(MomentOptimizer):
    """Stable-SPAM with the paper's 4-bit defaults (gamma1 0.7, gamma2 0.9, theta 0.999, reset every 500)."""

    stats_fields = ("clip_ema", "norm_ema", "norm_sq_ema", "ema_count", "adam_count", "skipped")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma1: float = 0.7, gamma2: float = 0.9,
                 theta: float = 0.999, reset_interval: int | None = 500, total_T: int | None = None,
                 eta_min: float = 0.5, code_exact: bool = False, state_bits: int = 32,
                 block_size: int | None = None, fused: bool = False) -> None:
        defaults = self.check_options(dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma1=gamma1, gamma2=gamma2, theta=theta,
            reset_interval=reset_interval, total_T=total_T, eta_min=eta_min, code_exact=code_exact,
            state_bits=state_bits, block_size=block_size))
        self.fused = bool(fused)  # before super().__init__, which adds the param groups
        self._kernels = load_fused_kernels() if self.fused else None
        super().__init__(params, defaults)

    @staticmethod
    def check_options(options: dict) -> dict:
        options = check_common(options)
        check_range("gamma1", options["gamma1"], 0.0, 1.0)
        check_range("gamma2", options["gamma2"], 0.0, 1.0)
        check_range("theta", options["theta"], 0.0, 1.0)
        check_range("eta_min", options["eta_min"], 0.0, 1.0, high_open=False)
        check_interval("reset_interval", options["reset_interval"])
        check_interval("total_T", options["total_T"])
        return {**options, "code_exact": bool(options["code_exact"])}

    def __getstate__(self) -> dict:
        """torch pickles only defaults/state/param_groups; the implementation choice travels too."""
        return {**super().__getstate__(), "fused": self.fused}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fused", False)
        self._kernels = load_fused_kernels() if self.fused else None

    def add_param_group(self, param_group: dict) -> None:
        """As the base class; a group may not choose another implementation."""
        if param_group.get("fused", self.fused) != self.fused:
            raise ValueError(f"a param group sets fused={param_group['fused']!r} but this optimizer was built with "
                             f"fused={self.fused}: the implementation is chosen for the whole optimizer")
        super().add_param_group({k: v for k, v in param_group.items() if k != "fused"})

    def _check_params(self, params: list[torch.Tensor]) -> None:
        """fused=True refuses the parameters its kernels cannot step."""
        for param in params if self.fused else ():
            reason = self._kernels.unsupported_reason(param)
            if reason:
                raise ValueError(f"fused=True cannot step a parameter of shape {tuple(param.shape)}: {reason}")

    def _step_bucket(self, group: dict, step: int, params: list[torch.Tensor], grads: list[torch.Tensor],
                     states: list[dict], seed: int) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        interval, code_exact = group["reset_interval"], group["code_exact"]
        decay = beta_decay(step, group["total_T"], group["eta_min"], code_exact)
        reset = interval is not None and step % interval == 0

        stats = torch.stack([s["stats"] for s in states])
        beta1, beta2, gamma1, gamma2, theta = (ema_coefficient(c, stats.dtype) for c in (
            group["betas"][0] * decay, group["betas"][1], group["gamma1"] * decay, group["gamma2"], group["theta"]))
        clip_ema, norm_ema, norm_sq_ema, ema_count, adam_count, skipped = stats.unbind(1)
        gmax = torch.stack(torch._foreach_norm(grads, math.inf)).to(stats.dtype)
        finite = torch.isfinite(gmax * gmax)  # a square that overflows would make AdaGN's statistics inf

        # The EMA bias counter: j (never reset) in the clean algorithm, the Adam counter before the reset
        # in the reference code (it increments k, clips, then resets).
        ema_count_new = ema_count + 1
        count = adam_count + 1 if code_exact else ema_count_new
        adam_count_new = torch.ones_like(adam_count) if reset else adam_count + 1

        # AdaClip: threshold from the EMA of pre-clip maxima.
        clip_ema_new = theta * clip_ema + (1 - theta) * gmax
        tau = clip_ema_new / bias_correction(theta, count)
        ratio = torch.where(gmax > tau, tau / gmax, torch.ones_like(tau))
        if self.fused:
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
            norm = self._kernels.clipped_norms(grads, tau, ratio)
        else:
            work = clipped_copies(grads, finite, stats.dtype, tau, ratio)
            norm = torch.stack(torch._foreach_norm(work, 2))

        # AdaGN: rescale each tensor's norm to a smoothed mean/RMS ratio of recent norms.
        norm_ema_new = gamma1 * norm_ema + (1 - gamma1) * norm
        norm_sq_ema_new = gamma2 * norm_sq_ema + (1 - gamma2) * norm * norm
        # Elements each finite can still sum to a norm whose square overflows: skipped like an inf.
        finite = finite & torch.isfinite(norm_sq_ema_new)
        target = (norm_ema_new / bias_correction(gamma1, count)) / (
            torch.sqrt(norm_sq_ema_new / bias_correction(gamma2, count)) + eps)
        scale = torch.where(norm > 0, target / norm, torch.ones_like(norm))
        # (1 - beta1) is folded into the gradient; skipped tensors get 0 and keep m and v.
        grad_scale = torch.where(finite, scale * (1 - beta1), 0)
        # With code_exact the reset step runs with k = 1 on the old moments, so adam_count_new is right
        # for both modes.
        bias1 = bias_correction(beta1, adam_count_new)
        rsqrt_bias2 = torch.rsqrt(bias_correction(beta2, adam_count_new))
        step_size = torch.where(finite, -lr / bias1, 0)
        exp_avg, exp_avg_sq, coded = self._load_moments(params, states, group)
        clean_reset = reset and not code_exact
        v_coef = (1 - beta2) / (1 - beta1) ** 2

        if self.fused:
            per_tensor = dict(tau=tau, ratio=ratio, grad_scale=grad_scale, finite=finite, step_size=step_size,
                              rsqrt_bias2=rsqrt_bias2)
            constants = dict(keep_old=0.0 if clean_reset else 1.0, beta1=beta1, beta2=beta2, v_coef=v_coef,
                             decay=1 - lr * wd, eps=eps)
            self._kernels.update(params, grads, exp_avg, exp_avg_sq, per_tensor, constants)
        else:
            one = torch.ones_like(gmax)
            torch._foreach_mul_(work, list(grad_scale.unbind()))
            if wd:
                torch._foreach_mul_(params, list(torch.where(finite, 1 - lr * wd, one).unbind()))
            if clean_reset:
                torch._foreach_zero_(exp_avg)
                torch._foreach_zero_(exp_avg_sq)
            torch._foreach_mul_(exp_avg, list(torch.where(finite, beta1, one).unbind()))
            torch._foreach_add_(exp_avg, work)
            torch._foreach_mul_(exp_avg_sq, list(torch.where(finite, beta2, one).unbind()))
            torch._foreach_addcmul_(exp_avg_sq, work, work, value=v_coef)
            del work  # free the gradient copy before the update buffers are allocated
            # W += step * m / (sqrt(v) rb + eps) as W += m / ((sqrt(v) + eps / rb) (rb / step)): one addcdiv. A
            # skipped tensor (step 0) divides by +-inf and adds exactly 0.
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_add_(denom, list((eps / rsqrt_bias2).unbind()))
            torch._foreach_mul_(denom, list((rsqrt_bias2 / step_size).unbind()))
            torch._foreach_addcdiv_(params, exp_avg, denom)

        if reset and code_exact:  # the reference replaces the state only after using the old moments
            torch._foreach_zero_(exp_avg)
            torch._foreach_zero_(exp_avg_sq)
        # A skipped tensor keeps its codes, except at a reset, which zeroes its moments too.
        self._store_moments(states, coded, seed, None if reset else finite)

        kept_count = torch.zeros_like(adam_count) if reset else adam_count
        new_stats = torch.stack([
            torch.where(finite, clip_ema_new, clip_ema),
            torch.where(finite, norm_ema_new, norm_ema),
            torch.where(finite, norm_sq_ema_new, norm_sq_ema),
            torch.where(finite, ema_count_new, ema_count),
            torch.where(finite, adam_count_new, kept_count),
            skipped + (~finite).to(stats.dtype),
        ], dim=1)
        torch._foreach_copy_([s["stats"] for s in states], list(new_stats.unbind(0)))
