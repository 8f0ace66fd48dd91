"""Plain, slow reference implementations written straight from the papers' equations (tests only).

One Python loop per tensor, Python floats for every scalar, explicit masks: the opposite of the
multi-tensor code under test, so the two can only agree if both follow the equations.
"""

from __future__ import annotations

import math

import torch


def cosine(step: int, length: int, start: float, end: float) -> float:
    if length <= 0:
        return end
    frac = min(step, length) / length
    return end + (start - end) * (1 + math.cos(math.pi * frac)) / 2


class RepoCosineDecay:
    """The reference repo's c_T: torch's CosineAnnealingLR on a dummy optimizer with lr 1 and
    T_max = total_T + 1, read at every global step (galore_torch/stablespam.py, CosineDecay)."""

    def __init__(self, total_T: int, eta_min: float):
        self.sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.sgd, total_T + 1, eta_min)

    def next(self) -> float:
        self.sgd.step()  # no gradient: a no-op that keeps the scheduler from warning
        self.schedule.step()
        return self.sgd.param_groups[0]["lr"]


class ReferenceStableSPAM:
    """Stable-SPAM per shared/spec/stable_spam.md, clean algorithm or the reference repo's behaviour."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7, gamma2=0.9,
                 theta=0.999, reset_interval=500, total_T=None, eta_min=0.5, code_exact=False):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.gamma1, self.gamma2, self.theta = gamma1, gamma2, theta
        self.interval, self.total_T, self.eta_min, self.code_exact = reset_interval, total_T, eta_min, code_exact
        self.T = 0
        self.repo_decay = RepoCosineDecay(total_T, eta_min) if total_T and code_exact else None
        self.clip_events = 0  # (tensor, step) pairs where AdaClip changed something: tests check it is exercised
        self.state = {id(p): dict(m=torch.zeros_like(p), v=torch.zeros_like(p), k=0, j=0, M=0.0, a=0.0, b=0.0)
                      for p in self.params}

    @torch.no_grad()
    def step(self):
        self.T += 1
        if self.repo_decay is not None:
            c_T = self.repo_decay.next()
        else:  # clean: 1 down to eta_min at total_T, then flat
            c_T = cosine(self.T, self.total_T, 1.0, self.eta_min) if self.total_T else 1.0
        beta1, beta2 = self.betas[0] * c_T, self.betas[1]
        gamma1 = self.gamma1 * c_T
        reset = self.interval is not None and self.T % self.interval == 0
        for p in self.params:
            s = self.state[id(p)]
            g = p.grad.clone()
            p.mul_(1 - self.lr * self.wd)
            s["k"] += 1
            s["j"] += 1
            count = s["k"] if self.code_exact else s["j"]
            # AdaClip
            G = g.abs().max().item()
            s["M"] = self.theta * s["M"] + (1 - self.theta) * G
            tau = s["M"] / (1 - self.theta ** count)
            mask = g.abs() > tau
            if mask.any():
                g[mask] = g[mask] * (tau / G)
                self.clip_events += 1
            # AdaGN
            n = g.norm().item()
            s["a"] = gamma1 * s["a"] + (1 - gamma1) * n
            s["b"] = self.gamma2 * s["b"] + (1 - self.gamma2) * n * n
            c = (s["a"] / (1 - gamma1 ** count)) / (math.sqrt(s["b"] / (1 - self.gamma2 ** count)) + self.eps)
            if n > 0:
                g = g * (c / n)
            # Reset
            m, v = s["m"], s["v"]
            if reset:
                s["m"], s["v"], s["k"] = torch.zeros_like(p), torch.zeros_like(p), 1
                if not self.code_exact:
                    m, v = s["m"], s["v"]
            # Adam (code_exact: m, v are still the old tensors at the reset step)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            k = s["k"]
            denom = (v / (1 - beta2 ** k)).sqrt() + self.eps
            p.add_(-(self.lr / (1 - beta1 ** k)) * m / denom)


class ReferenceSPAM:
    """SPAM per shared/spec/stable_spam.md: spike clipping against the old v, reset, cosine warmup."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, threshold=5000.0,
                 reset_interval=500, warmup_steps=150, clip_delay=20):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.threshold, self.interval, self.warmup, self.delay = threshold, reset_interval, warmup_steps, clip_delay
        self.T = 0
        self.clip_events = 0
        self.state = {id(p): dict(m=torch.zeros_like(p), v=torch.zeros_like(p), t=0) for p in self.params}

    @torch.no_grad()
    def step(self):
        self.T += 1
        since = self.T % self.interval if self.interval else self.T
        ramp = cosine(since, self.warmup, 0.01, 1.0)
        beta1, beta2 = self.betas
        for p in self.params:
            s = self.state[id(p)]
            g = p.grad.clone()
            if since == 0:
                s["m"].zero_()
                s["v"].zero_()
            if self.threshold > 0 and since >= self.delay:
                spike = (g ** 2 > self.threshold * s["v"]) & (s["v"] > 0)  # no v yet: nothing to spike against
                g[spike] = g[spike].sign() * (self.threshold * s["v"][spike]).sqrt()
                self.clip_events += int(spike.any())
            s["t"] += 1
            s["m"].mul_(beta1).add_(g, alpha=1 - beta1)
            s["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            size = self.lr * ramp * math.sqrt(1 - beta2 ** s["t"]) / (1 - beta1 ** s["t"])
            p.add_(-size * s["m"] / (s["v"].sqrt() + self.eps))
            p.mul_(1 - self.lr * self.wd)
