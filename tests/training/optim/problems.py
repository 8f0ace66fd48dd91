"""Random test problems of mixed shapes, with gradient spikes injected on a fixed schedule (tests only)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SHAPES = ((7, 5), (13,), (4, 3, 2), (1,), (33, 9))


def make_params(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)) for shape in SHAPES]


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def gradient_stream(params: list[torch.Tensor], steps: int, seed: int = 1, spike_every: int = 5,
                    spike_size: float = 1000.0) -> list[list[torch.Tensor]]:
    """Per step, one gradient per tensor: a drifting mean, noise, a 1000x element spike every few steps,
    and now and then an all-zero gradient (to hit the n = 0 branch)."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for t in range(steps):
        grads = []
        for i, p in enumerate(params):
            g = 0.3 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) + t / 7).view(p.shape)
            g = g + torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1 + i)
            if t % spike_every == spike_every - 1:
                flat = g.view(-1)
                flat[(t * 7 + i) % flat.numel()] *= spike_size
            if t == 11 and i == 2:
                g = torch.zeros_like(g)
            grads.append(g.to(p.dtype))
        stream.append(grads)
    return stream


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.to(p.device, copy=True)


def fused_device() -> str:
    """Where StableSPAM(fused=True) runs in tests: CUDA, else the CPU under Triton's interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_device(params: list[torch.nn.Parameter], device: str) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().to(device, copy=True)) for p in params]


def assert_same_trajectory(opt, params: list[torch.Tensor], ref, ref_params: list[torch.Tensor],
                           stream: list[list[torch.Tensor]], rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Step `opt` and `ref` on the same gradients; their parameters must agree after every step."""
    for grads in stream:
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=rtol, atol=atol)
